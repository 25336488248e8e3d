"""The replica supervisor: start a replica, prove a starting one a step, restart one that died.

It does what the planner (``serving._planner``) decides about single replicas,
and reports what it sees back to it: :meth:`Supervisor.prove` takes every
starting replica one step of its proof on each poll and records the outcome on
the replica and its slot (ready, proved, or why it failed); the planner then
decides whether to route the version, give it up, or restart the replica.

:class:`Liveness` pings every proved replica on a thread of its own, so a
replica that stops answering (hung, not dead: its process still runs) leaves
the rotation within about ``PING_TIMEOUT_S`` and, once silent for
``SwitchPolicy.replace_after``, is replaced (:meth:`Supervisor.replace`).

Each replica's log (``mlflow models serve``'s output; access lines only when
``access_log`` is asked for) is kept under ``REPLICA_LOG_MAX_BYTES``: past it,
it is copied to ``<log>.1`` and emptied in place (the server appends, so it
writes on at the start of the emptied file; a line written during the copy can
be lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from serving import _model_server
from serving._slots import Replica, Slot
from stageflow import manifest, processes
from stageflow.errors import StageflowError

# The controller's account of its work is one log stream, whichever module does
# the work: users filter `stageflow serve`'s log on this name.
logger = logging.getLogger("serving.controller")

LOG_TAIL_LINES = 8
REPLICA_LOG_MAX_BYTES = 10 * 1024 * 1024
# Liveness pings: each proved replica every PING_INTERVAL_S; one that has not
# answered in PING_TIMEOUT_S missed it.
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 1.0
KILL_WAIT_S = 5.0
# A replica whose restart was refused (its copy does not verify) is tried again after this.
RESTART_RETRY_S = 30.0


class Supervisor:
    """Starts, proves and restarts ``model_name``'s replicas; every pid it starts is recorded.

    Args:
        model_name: the registered model whose versions the replicas serve.
        tracking_uri: the tracking server the replicas load the model from.
        directory: where each replica's log goes.
        model_config: handed to every replica's pyfunc as ``model_config``.
        started_pids: every process started is appended here.
    """

    def __init__(
        self,
        model_name: str,
        tracking_uri: str,
        directory: Path,
        model_config: dict[str, Any] | None,
        started_pids: list[int],
        access_log: bool = False,
    ):
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.directory = directory
        self.model_config = model_config
        self.started_pids = started_pids
        self.access_log = access_log

    def start(self, slot: Slot, replica: Replica) -> None:
        """Start ``slot``'s version as ``replica`` (appending to its log if it had one)."""
        version = str(slot.version)
        log_path = replica.log_path or self.directory / f"v{version}-replica-{replica.address}.log"
        _model_server.start(
            self.model_name,
            version,
            replica,
            self.tracking_uri,
            log_path,
            self._verified(slot),
            self.model_config,
            access_log=self.access_log,
        )
        self.started_pids.append(replica.proc.pid)

    def _verified(self, slot: Slot) -> Path:
        """The slot's local copy, checked again before each (re)start of a replica.

        The copy was verified as the version started (``Effects``); a restart checks
        its files against the manifest kept with it, so a copy changed on this host is
        refused too (the restart fails, its siblings keep serving).
        """
        assert slot.model_dir is not None, "Effects makes the verified copy before starting"
        manifest.verify(
            slot.model_dir,
            manifest.kept_manifest(slot.model_dir),
            f"version {slot.version} of {self.model_name} (local copy {slot.model_dir})",
        )
        return slot.model_dir

    def prove(self, slots: list[Slot]) -> None:
        """Take every starting replica one step of its proof; record what came of it.

        A starting version is proved once one replica answers its example (on two
        busy cores, waiting for all of them doubled the time to switch); the others
        join the rotation as each proves itself. Until a version is proved, a
        replica that fails marks the whole version failed (``Slot.failure``);
        afterwards only that replica (``Replica.failure``).
        """
        for slot in slots:
            if slot.version is None or slot.failure is not None:
                continue
            for replica in slot.replicas:
                if replica.ready or replica.proc is None or replica.failure is not None:
                    continue
                try:
                    ready = _model_server.prove_ready(replica, str(slot.version), slot.example)
                except StageflowError as exc:
                    if not slot.proved:
                        slot.failure, slot.failure_log = str(exc), replica.log_path
                        break
                    replica.failure = str(exc)
                    continue
                if ready and slot.proved:
                    logger.info(
                        "version %s's replica on %s is ready (started %.1fs ago)%s",
                        slot.version,
                        replica.address,
                        time.monotonic() - replica.started_at,
                        "; the front door routes requests to it" if slot.routed else "",
                    )
            if slot.failure is None and any(replica.ready for replica in slot.replicas):
                slot.proved = True

    def restart(self, slot: Slot, replica: Replica, exited: bool, serving: bool) -> None:
        """Start ``replica`` again while its siblings serve.

        Args:
            exited: it had proved itself and died (its exit is logged first).
            serving: ``slot`` is the version the front door routes to.
        """
        if exited:
            if not serving:
                meanwhile = f"version {slot.version} is not routed"
            elif count := slot.serving():
                meanwhile = f"{count} other replica(s) serve meanwhile"
            else:
                meanwhile = "nothing is served until one is back"
            logger.error(
                "version %s's replica on %s exited with code %s; restarting it (%s). "
                "Its log: %s, ending:\n%s",
                slot.version,
                replica.address,
                replica.exit_code(),
                meanwhile,
                replica.log_path,
                indent(processes.tail(replica.log_path, lines=LOG_TAIL_LINES)),
            )
        log_path = replica.log_path
        _model_server.stop_replica(replica)  # whatever the dead one left behind
        replica.log_path = log_path
        try:
            self.start(slot, replica)
        except StageflowError as exc:  # its local copy no longer verifies: never started
            self.retry_later(slot, replica, str(exc), time.monotonic() + RESTART_RETRY_S)

    def replace(self, slot: Slot, replica: Replica, silent_for: float, serving: bool) -> None:
        """Kill a hung replica's process group (it answers no signal it would have to
        handle, SIGTERM included) and start a fresh one in its place."""
        meanwhile = (
            f"{slot.serving()} other replica(s) serve meanwhile"
            if serving
            else f"version {slot.version} is not routed"
        )
        logger.error(
            "version %s's replica on %s (pid %s) runs but has answered no liveness ping for "
            "%.1fs; killing it and starting a fresh one (%s). Its log: %s, ending:\n%s",
            slot.version,
            replica.address,
            replica.pid,
            silent_for,
            meanwhile,
            replica.log_path,
            indent(processes.tail(replica.log_path, lines=LOG_TAIL_LINES)),
        )
        if replica.proc is not None:
            _kill_group(replica.proc)
        self.restart(slot, replica, exited=False, serving=serving)

    def cap_logs(self, slots: list[Slot]) -> None:
        """Keep every replica's log under ``REPLICA_LOG_MAX_BYTES`` (see the module docstring)."""
        for slot in slots:
            for replica in slot.replicas:
                if replica.log_path is not None:
                    cap_log(replica.log_path, REPLICA_LOG_MAX_BYTES)

    def retry_later(self, slot: Slot, replica: Replica, error: str, retry_at: float) -> None:
        """Stop a restarted replica that failed its proof; it is restarted at ``retry_at``."""
        log_path = replica.log_path
        _model_server.stop_replica(replica)
        replica.log_path = log_path  # the next restart appends to the same log
        replica.retry_at = retry_at
        logger.error(
            "%s; retrying in %.0fs while %d other replica(s) of version %s run. "
            "Its log: %s, ending:\n%s",
            error,
            max(0.0, retry_at - time.monotonic()),
            sum(r.ready and r.alive() for r in slot.replicas),
            slot.version,
            log_path,
            indent(processes.tail(log_path, lines=LOG_TAIL_LINES)),
        )


def indent(text: str) -> str:
    return textwrap.indent(text, "    ")


def cap_log(path: Path, max_bytes: int) -> bool:
    """Past ``max_bytes``, copy ``path`` to ``<path>.1`` and empty it in place; True if it did.

    The writer keeps its file open in append mode, so it goes on writing at the
    start of the emptied file (the ``copytruncate`` of logrotate).
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    except OSError as exc:
        logger.warning("could not cap the log %s: %s", path, exc)
        return False
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_WAIT_S)


class Liveness:
    """Pings every proved, running replica every ``interval``; records who answers.

    A ping is ``GET /ping`` with a ``timeout``; the replica's ``answered_at`` and
    ``missed_pings`` say how it went (``Replica.responsive``, ``Slot.healthy``). A
    replica that is busy scoring still answers: MLflow's scoring server predicts
    on a worker thread, and its event loop answers ``/ping``. All replicas are
    pinged at once, so one that hangs delays no other's ping.
    """

    def __init__(
        self,
        slots: list[Slot],
        interval: float = PING_INTERVAL_S,
        timeout: float = PING_TIMEOUT_S,
    ):
        self.slots = slots
        self.interval = interval
        self.timeout = timeout
        self._stop = threading.Event()
        count = sum(len(slot.replicas) for slot in slots)
        self._pool = ThreadPoolExecutor(max_workers=max(1, count), thread_name_prefix="liveness")
        self._thread = threading.Thread(target=self._run, name="replica-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def ping_all(self) -> None:
        """One round: ping every proved, running replica at once, and record the answers."""
        targets = [
            (replica, replica.proc)
            for slot in self.slots
            for replica in slot.replicas
            if replica.ready and replica.alive()
        ]
        answers = list(self._pool.map(lambda target: self._answers(target[0]), targets))
        now = time.monotonic()
        for (replica, proc), answered in zip(targets, answers, strict=True):
            if replica.proc is not proc or not replica.ready:
                continue  # restarted meanwhile: the new one proves itself
            if answered:
                replica.answered_at, replica.missed_pings = now, 0
            else:
                replica.missed_pings += 1

    def _answers(self, replica: Replica) -> bool:
        try:
            return requests.get(replica.url + "/ping", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.ping_all()
            except Exception:
                logger.exception("a round of liveness pings failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))
