"""The replica supervisor: start a replica, prove a starting one a step, restart one that died.

It does what the planner (``serving._planner``) decides about single replicas,
and reports what it sees back to it: :meth:`Supervisor.prove` takes every
starting replica one step of its proof on each poll and records the outcome on
the replica and its slot (ready, proved, or why it failed); the planner then
decides whether to route the version, give it up, or restart the replica.
"""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path
from typing import Any

from serving import _model_server
from serving._slots import Replica, Slot
from stageflow import manifest, processes
from stageflow.errors import StageflowError

# The controller's account of its work is one log stream, whichever module does
# the work: users filter `stageflow serve`'s log on this name.
logger = logging.getLogger("serving.controller")

LOG_TAIL_LINES = 8
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
    ):
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.directory = directory
        self.model_config = model_config
        self.started_pids = started_pids

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
                        "; it takes requests again" if slot.routed else "",
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
