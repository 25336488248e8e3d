"""``stageflow serve``: keep the registry's Production version answering at one fixed address.

The controller runs a Caddy front door with a fixed configuration (see
:mod:`serving.frontdoor`) and gives each live version a *slot* of N replicas:
N single-worker ``mlflow models serve`` processes, each on its own loopback
address, among which the front door balances (see :mod:`serving._slots`).
Each runs its math libraries on one thread (replicas give the parallelism)
and loads the model with the ``model_config`` given to :func:`serve`.
It polls the registry and brings what runs in line with what it reads:

- **Production changed** (promotion or rollback): unless the new version is
  already warm (the rollback standby, or the Staging version warmed ahead of
  its promotion), start it on a free slot and prove that every replica answers
  ``/ping`` and the version's own input example. Only then switch:

  1. route the new slot, and wait until the front door has probed its replicas healthy;
  2. unroute the old slot, and wait until the front door has probed them unhealthy;
  3. keep the old version running, unrouted, as the rollback standby (requests
     already sent to it finish there);
  4. stop the standby it replaces (SIGTERM: uvicorn finishes what is in flight),
     once that has been unrouted for at least ``SwitchPolicy.drain``.

- **Staging holds a version** that is not already running: start it on a free
  slot and prove it, unrouted, so that promoting it is only a front-door switch.
  When Staging moves on, that warm server stops (unless it serves by then or is
  the rollback standby).

- **A replica died**: restart it while its siblings serve. The front door stops
  sending it requests within one health interval, retries on a sibling a
  request it dropped, and sends it requests again once it has proved itself.

Starting servers never blocks the loop: each poll takes a starting replica one
step further (see :func:`serving._model_server.prove_ready`), so a rollback is
not held up by a version warming beside it.

At every moment some replica is healthy, so no request is dropped; a request
that arrives while none is (nothing promoted yet) waits up to
``FrontDoorTimings.try_duration`` for one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

import registry
from serving import _model_server, inference_log
from serving._model_server import VERSION_HEADER
from serving._slots import HealthServer, Replica, Slot, make_slots
from serving.frontdoor import FrontDoor, FrontDoorTimings
from stageflow import processes, tracking
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 8
# Replicas by default: one per CPU core, since each prediction runs on one thread
# (OMP_NUM_THREADS=1); no more than this, since every replica holds its own copy
# of the model for each live version (serving, rollback standby, warm Staging).
DEFAULT_REPLICAS_CAP = 4
MAX_REPLICAS = 16

__all__ = [
    "VERSION_HEADER",
    "BackgroundServe",
    "Controller",
    "SwitchPolicy",
    "default_replicas",
    "serve",
]


@dataclass(frozen=True)
class SwitchPolicy:
    """How the controller paces itself.

    Attributes:
        probe_wait: longest wait for the front door to probe a slot's replicas
            after their answer changed (a few health intervals).
        drain: time left for requests already sent to an unrouted slot before it stops.
        retry_after: after a version (or a replica's restart) failed to start,
            wait this long before trying again.
    """

    probe_wait: float = 5.0
    drain: float = 1.0
    retry_after: float = 30.0


def default_replicas() -> int:
    """The CPU cores this process may use, at most ``DEFAULT_REPLICAS_CAP`` (2 on 2 cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_REPLICAS_CAP))


def serve(
    model_name: str,
    port: int = 8080,
    tracking_uri: str | None = None,
    poll_interval: float = 1.0,
    home: Path | None = None,
    stop_event: threading.Event | None = None,
    metrics_port: int | None = None,
    replicas: int | None = None,
    model_config: dict[str, Any] | None = None,
) -> None:
    """Serve ``model_name``'s Production version on ``http://127.0.0.1:port`` until stopped.

    Each live version runs as ``replicas`` model server processes (default:
    :func:`default_replicas`). ``model_config`` is handed to every one of them
    as the pyfunc's ``model_config`` (MLflow's ``SERVING_MODEL_CONFIG``).
    Caddy's Prometheus metrics are served on ``http://127.0.0.1:METRICS_PORT/metrics``
    (a free port, logged at start, unless ``metrics_port`` names one).

    Blocks until SIGINT/SIGTERM (when called on the main thread) or until
    ``stop_event`` is set, then stops the front door and every model server.

    Example:
        >>> serve("wine", port=8080, replicas=2)  # then: curl -X POST localhost:8080/invocations

    Raises:
        TrackingServerUnreachable: the tracking server did not answer at start.
        UsageError: the port is already taken, or ``replicas`` is out of range.
        StageflowError: the front door could not start or died while serving.
    """
    Controller(
        model_name,
        port,
        tracking_uri,
        poll_interval,
        home,
        metrics_port=metrics_port,
        replicas=replicas,
        model_config=model_config,
    ).run(stop_event)


class Controller:
    """The state behind :func:`serve`: slots, front door, and what is routed where."""

    def __init__(
        self,
        model_name: str,
        port: int = 8080,
        tracking_uri: str | None = None,
        poll_interval: float = 1.0,
        home: Path | None = None,
        timings: FrontDoorTimings = FrontDoorTimings(),  # noqa: B008 - frozen
        policy: SwitchPolicy = SwitchPolicy(),  # noqa: B008 - frozen
        metrics_port: int | None = None,
        replicas: int | None = None,
        model_config: dict[str, Any] | None = None,
    ):
        replicas = default_replicas() if replicas is None else replicas
        if not 1 <= replicas <= MAX_REPLICAS:
            raise UsageError(f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
        self.model_name = model_name
        self.port = port
        self.uri = tracking.resolve_uri(tracking_uri)
        self.poll_interval = poll_interval
        self.directory = (home or tracking.home()) / "serve" / f"{_file_safe(model_name)}-{port}"
        self.timings = timings
        self.policy = policy
        self.metrics_port = metrics_port
        self.replicas = replicas
        # Every replica logs what it answers unless the config turns the log off.
        self.model_config = inference_log.serving_config(model_config, home or tracking.home())
        self.slots: list[Slot] = []
        self.front_door: FrontDoor | None = None
        self.started_pids: list[int] = []
        self.serving = threading.Event()
        self._client: MlflowClient | None = None
        self._health: HealthServer | None = None
        self._active: Slot | None = None
        # The previous Production, kept running but unrouted: a rollback to it is a
        # front-door switch, not a cold start (DESIGN.md, "Serving semantics").
        self._standby: Slot | None = None
        # The Staging version, proved and unrouted: its promotion is a switch too.
        self._warm: Slot | None = None
        # Live versions the last poll found unneeded (slot → version); see _stop_unneeded.
        self._unneeded: dict[Slot, str] = {}
        self._retry_at: dict[str, float] = {}
        self._failed_starts: dict[str, int] = {}
        self._registry_error: str | None = None
        self._said_waiting = False
        self._said_no_free_slot = False
        self._shutting_down = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> list[tuple[str, int]]:
        """Every (address, port) this controller or its children listen on while serving."""
        found = [("127.0.0.1", self.port)]
        if self.front_door is not None and self.front_door.metrics_port:
            found.append(("127.0.0.1", self.front_door.metrics_port))
        for replica in self._replicas():
            found.append((replica.address, replica.port))
            if self._health is not None:
                found.append((replica.address, self._health.port))
        return found

    @property
    def serving_version(self) -> str | None:
        return self._active.version if self._active else None

    @property
    def standby_version(self) -> str | None:
        return self._standby.version if self._standby else None

    @property
    def staging_version(self) -> str | None:
        """The Staging version once it is warm (proved, unrouted) for its promotion."""
        return self._warm.version if self._warm else None

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Start, follow the registry until ``stop_event`` (or a signal), then stop everything."""
        stop = stop_event or threading.Event()
        with _stop_on_signals(stop, self._shutting_down):
            try:
                self._start()
                while not stop.is_set():
                    self._check_front_door()
                    self._poll(stop)
                    stop.wait(self.poll_interval)
            except KeyboardInterrupt:  # a second signal insists
                pass
            finally:
                self._shutdown()

    # -- start and stop ------------------------------------------------------

    def _start(self) -> None:
        self.uri = tracking.require_server(self.uri)
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.slots, health_port = make_slots(self.replicas)
        self._health = HealthServer(self.slots, health_port)
        self._health.start()
        self.front_door = FrontDoor(
            self.port,
            self.slots,
            health_port,
            self.directory,
            self.timings,
            metrics_port=self.metrics_port or processes.free_port(),
        )
        proc = self.front_door.start()
        self.started_pids.append(proc.pid)
        logger.info(
            "front door for %s listening on %s (Caddy pid %d; %d slots of %d replica(s) on "
            "%s … %s; health port %d; metrics %s; config and logs in %s)",
            self.model_name,
            self.url,
            proc.pid,
            len(self.slots),
            self.replicas,
            self.slots[0].replicas[0].address,
            self.slots[-1].replicas[-1].address,
            health_port,
            self.front_door.metrics_url,
            self.directory,
        )

    def _shutdown(self) -> None:
        self._shutting_down.set()
        self.serving.clear()
        live = [slot for slot in self.slots if slot.version is not None]
        servers = sum(1 for replica in self._replicas() if replica.proc is not None)
        if self.front_door is not None or live:
            logger.info("stopping %s's front door and %d model server(s)", self.model_name, servers)
        # The front door first, so nothing new reaches a model server that is stopping.
        if self.front_door is not None:
            self.front_door.stop()
        for slot in live:
            _model_server.stop(slot)
        if self._health is not None:
            self._health.close()
        self._active = self._standby = self._warm = None
        if self.front_door is not None or live:
            logger.info("stopped serving %s", self.model_name)

    def _check_front_door(self) -> None:
        door = self.front_door
        if door is not None and not door.alive():
            code = door.proc.returncode if door.proc else None
            logger.error(
                "the front door (Caddy) exited with code %s; its log: %s, ending:\n%s",
                code,
                door.log_path,
                _indent(processes.tail(door.log_path, lines=LOG_TAIL_LINES)),
            )
            raise StageflowError(
                f"the front door (Caddy) exited with code {code}; its log: {door.log_path}"
            )

    # -- one poll --------------------------------------------------------------

    def _poll(self, stop: threading.Event) -> None:
        stages = self._read_registry()
        self._tend()
        if stages is None:  # the registry is away: keep what runs as it is
            return
        production, staging = stages
        # Stopping first frees slots for what the registry asks to start.
        self._stop_unneeded(production, staging)
        if production is not None:
            self._follow_production(production, stop)
        self._follow_staging(staging, production)

    def _read_registry(self) -> tuple[str | None, str | None] | None:
        """The registry's (Production, Staging) versions; None if the registry is away."""
        try:
            if self.uri.startswith(("http://", "https://")) and not processes.http_ok(
                self.uri.rstrip("/") + "/health", timeout=2.0
            ):
                # Checked first: MLflow's client retries a dead server for minutes.
                raise ConnectionError("its /health does not answer")
            # Staging first: a promotion sets the Production alias before it removes
            # the Staging one, so reading in this order sees a version that moves
            # from Staging to Production in at least one of the two, never in neither.
            staging = registry.current_version(self._client, self.model_name, registry.STAGING)
            production = registry.current_version(
                self._client, self.model_name, registry.PRODUCTION
            )
        except Exception as exc:  # whatever the registry did, keep serving what serves
            self._note_registry_error(exc)
            return None
        if self._registry_error is not None:
            logger.info("the tracking server at %s answers again", self.uri)
            self._registry_error = None
        if production is None:
            self._note_no_production()
        else:
            self._said_waiting = False
        return production, staging

    def _note_registry_error(self, exc: Exception) -> None:
        first = self._registry_error is None
        self._registry_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if first:
            still = (
                f"still serving version {self.serving_version}"
                if self._active
                else "nothing is being served yet"
            )
            logger.warning(
                "cannot read %s's Production and Staging versions from the tracking server "
                "at %s (%s); %s; will keep trying",
                self.model_name,
                self.uri,
                self._registry_error,
                still,
            )

    def _note_no_production(self) -> None:
        if self._said_waiting:
            return
        self._said_waiting = True
        if self._active is not None:
            logger.warning(
                "%s has no Production version any more; still serving version %s until one "
                "is promoted",
                self.model_name,
                self._active.version,
            )
        else:
            logger.info(
                "no Production version of %s yet; waiting — promote one with "
                "`stageflow promote --model %s --version V --to Production`",
                self.model_name,
                self.model_name,
            )

    # -- replicas: prove the starting ones, restart the dead ones -----------------

    def _tend(self) -> None:
        """Take starting versions one step further, and keep proved ones' replicas running."""
        for slot in self.slots:
            if slot.version is None:
                continue
            if not slot.proved:
                self._advance_start(slot)
                continue
            for replica in slot.replicas:
                self._tend_replica(slot, replica)
        if self._active is not None and self._active.serving():
            self.serving.set()
        else:
            self.serving.clear()

    def _advance_start(self, slot: Slot) -> None:
        """Take each replica of a starting version one step; the slot is proved once one is.

        A cold version is switched to as soon as one replica answers its example
        (on two busy cores, waiting for all of them doubled the time to switch);
        the others join the rotation as each proves itself (see ``_tend_replica``).
        """
        for replica in slot.replicas:
            if replica.ready:
                continue
            try:
                _model_server.prove_ready(replica, str(slot.version), slot.example)
            except StageflowError as exc:
                self._give_up_on(slot, exc, replica)
                return
        if any(replica.ready for replica in slot.replicas):
            slot.proved = True

    def _tend_replica(self, slot: Slot, replica: Replica) -> None:
        """Keep one replica of a proved version running: restart it if it died."""
        if replica.ready and replica.alive():
            return
        if replica.ready:  # it had proved itself, and died since
            self._report_exit(slot, replica)
            self._restart(slot, replica)
        elif replica.proc is None:  # its last restart failed; try again when due
            if time.monotonic() >= replica.retry_at:
                self._restart(slot, replica)
        else:  # restarting: one step of its proof
            try:
                if _model_server.prove_ready(replica, str(slot.version), slot.example):
                    logger.info(
                        "version %s's replica on %s is ready (started %.1fs ago)%s",
                        slot.version,
                        replica.address,
                        time.monotonic() - replica.started_at,
                        "; it takes requests again" if slot.routed else "",
                    )
            except StageflowError as exc:
                log_path = replica.log_path
                _model_server.stop_replica(replica)
                replica.log_path = log_path  # the next restart appends to the same log
                replica.retry_at = time.monotonic() + self.policy.retry_after
                logger.error(
                    "%s; retrying in %.0fs while %d other replica(s) of version %s run. "
                    "Its log: %s, ending:\n%s",
                    exc,
                    self.policy.retry_after,
                    sum(r.ready and r.alive() for r in slot.replicas),
                    slot.version,
                    log_path,
                    _indent(processes.tail(log_path, lines=LOG_TAIL_LINES)),
                )

    def _report_exit(self, slot: Slot, replica: Replica) -> None:
        if slot is not self._active:
            meanwhile = f"version {slot.version} is not routed"
        elif serving := slot.serving():
            meanwhile = f"{serving} other replica(s) serve meanwhile"
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
            _indent(processes.tail(replica.log_path, lines=LOG_TAIL_LINES)),
        )

    def _restart(self, slot: Slot, replica: Replica) -> None:
        version = str(slot.version)
        log_path = replica.log_path or self._log_path(version, replica)
        _model_server.stop_replica(replica)  # whatever the dead one left behind
        _model_server.start(
            self.model_name, version, replica, self.uri, log_path, self.model_config
        )
        self.started_pids.append(replica.proc.pid)

    # -- following the registry ------------------------------------------------

    def _follow_production(self, version: str, stop: threading.Event) -> None:
        active = self._active
        if active is not None and active.version == version:
            return
        if time.monotonic() < self._retry_at.get(version, 0.0):
            return
        slot = self._slot_of(version)
        if slot is None:
            self._start_version(version, registry.PRODUCTION)
        elif slot.proved and any(r.ready and r.alive() for r in slot.replicas):
            self._switch_to(slot, stop)

    def _follow_staging(self, version: str | None, production: str | None) -> None:
        if self._warm is not None and self._warm.version != version:
            self._warm = None  # Staging moved on (_stop_unneeded stops it when unneeded)
        if version is None or version in (self.serving_version, production):
            return
        standby = self._standby
        if standby is not None and standby.version == version:
            if self._warm is not standby:
                self._warm = standby
                logger.info(
                    "version %s (Staging) is the rollback standby, already warm on %s",
                    version,
                    standby.where,
                )
            return
        if time.monotonic() < self._retry_at.get(version, 0.0):
            return
        slot = self._slot_of(version)
        if slot is None:
            self._start_version(version, registry.STAGING)
        elif slot.proved and self._warm is not slot:
            self._warm = slot
            logger.info(
                "version %s (Staging) is warm on %s for a promotion (ready in %.1fs)",
                version,
                slot.where,
                time.monotonic() - slot.started_at,
            )

    def _stop_unneeded(self, production: str | None, staging: str | None) -> None:
        """Stop every version that is neither served, the standby, Production nor Staging.

        Only once two polls in a row found it so: the registry is read in two
        calls, and a warm server stopped on a read that raced a promotion would
        make that promotion a cold start.
        """
        needed = {self._active, self._standby, self._slot_of(production), self._slot_of(staging)}
        unneeded = {
            slot: slot.version
            for slot in self.slots
            if slot.version is not None and slot not in needed
        }
        seen_before, self._unneeded = self._unneeded, unneeded
        for slot, version in list(unneeded.items()):
            if seen_before.get(slot) != version:
                continue
            if slot.alive() and time.monotonic() - slot.unrouted_at < self.policy.drain:
                continue  # requests sent to it before it was unrouted finish first
            if slot.unrouted_at:
                why = "no longer the rollback standby"
            elif slot.role == registry.STAGING:
                why = f"Staging is now version {staging}" if staging else "no longer in Staging"
            else:
                why = "no longer Production"
            where = slot.where
            if slot is self._warm:
                self._warm = None
            _model_server.stop(slot)
            del self._unneeded[slot]
            logger.info("stopped version %s on %s (%s)", version, where, why)

    def _slot_of(self, version: str | None) -> Slot | None:
        if version is None:
            return None
        return next((slot for slot in self.slots if slot.version == version), None)

    def _start_version(self, version: str, role: str) -> None:
        """Start every replica of ``version`` on a free slot; the polls that follow prove them."""
        slot = next((s for s in self.slots if s.is_free()), None)
        if slot is None:
            if not self._said_no_free_slot:
                self._said_no_free_slot = True
                logger.info(
                    "waiting for a slot to free up to start version %s (%s) in", version, role
                )
            return
        self._said_no_free_slot = False
        old = self.serving_version
        if self._failed_starts.get(version):
            logger.info("retrying version %s (%s) on %s", version, role, slot.where)
        elif role == registry.STAGING:
            logger.info(
                "Staging of %s is version %s: starting it on %s ahead of its promotion",
                self.model_name,
                version,
                slot.where,
            )
        elif old is None:
            logger.info(
                "Production of %s is version %s: starting it on %s",
                self.model_name,
                version,
                slot.where,
            )
        else:
            logger.info(
                "Production changed %s → %s: starting version %s on %s",
                old,
                version,
                version,
                slot.where,
            )
        slot.version, slot.role, slot.started_at = version, role, time.monotonic()
        try:
            slot.example = _model_server.serving_example(self.model_name, version)
            for replica in slot.replicas:
                _model_server.start(
                    self.model_name,
                    version,
                    replica,
                    self.uri,
                    self._log_path(version, replica),
                    self.model_config,
                )
                self.started_pids.append(replica.proc.pid)
        except Exception as exc:  # e.g. the registry could not give the model: try again later
            self._give_up_on(slot, StageflowError(f"{type(exc).__name__}: {exc}"))
            return
        if slot.example is None:
            logger.warning(
                "version %s was logged without an input example; proving it on /ping alone",
                version,
            )

    def _log_path(self, version: str, replica: Replica) -> Path:
        return self.directory / f"v{version}-replica-{replica.address}.log"

    # -- switching -----------------------------------------------------------------

    def _switch_to(self, slot: Slot, stop: threading.Event) -> None:
        old = self._active
        version = str(slot.version)
        if slot is self._standby:
            how = f"warm on {slot.where} as the rollback standby"
        elif slot is self._warm:
            how = f"warm on {slot.where} since it was in Staging"
        else:
            how = f"ready on {slot.where} (started in {time.monotonic() - slot.started_at:.1f}s)"
        if old is None:
            logger.info("version %s of %s is %s; routing it", version, self.model_name, how)
        else:
            logger.info(
                "Production of %s changed %s → %s: version %s is %s; switching",
                self.model_name,
                old.version,
                version,
                version,
                how,
            )
        began = time.monotonic()

        # 1. Route the new slot; both versions may now take traffic, and both are good.
        slot.routed = True
        if slot.wait_seen(healthy=True, timeout=self.policy.probe_wait):
            # Let Caddy record that probe before the old replicas start answering 503.
            stop.wait(self.timings.try_interval)
        else:
            logger.warning("the front door has not probed all of %s yet", slot.where)
        # 2. Unroute the old one; from the next probe on, everything goes to the new slot.
        if old is not None:
            old.routed = False
            old.unrouted_at = time.monotonic()
            old.wait_seen(healthy=False, timeout=self.policy.probe_wait)
        self._active = slot
        if self._standby is slot:
            self._standby = None
        if self._warm is slot:
            self._warm = None
        self._retry_at.pop(version, None)
        self._failed_starts.pop(version, None)
        self.serving.set()
        took = time.monotonic() - began
        if old is None:
            logger.info(
                "serving %s version %s on %s from %d replica(s)",
                self.model_name,
                version,
                self.url,
                len(slot.replicas),
            )
            return
        logger.info(
            "switched %s to version %s in %.1fs; version %s on %s no longer takes new requests",
            self.model_name,
            version,
            took,
            old.version,
            old.where,
        )
        # 3. The old version stays warm, unrouted, as the rollback standby; requests
        # already sent to it finish there. 4. The standby it replaces is stopped by
        # _stop_unneeded (after the drain, if it was only just unrouted).
        if old.alive():
            self._standby = old
            logger.info("version %s stays warm on %s for a rollback", old.version, old.where)
        else:  # every replica of it had died: nothing to keep warm
            old_version, where = old.version, old.where
            _model_server.stop(old)
            logger.info("stopped version %s on %s (its replicas had exited)", old_version, where)

    def _give_up_on(self, slot: Slot, exc: Exception, replica: Replica | None = None) -> None:
        version, role, where = str(slot.version), slot.role, slot.where
        log_path = replica.log_path if replica is not None else None
        ending = processes.tail(log_path, lines=LOG_TAIL_LINES)
        _model_server.stop(slot)
        self._retry_at[version] = time.monotonic() + self.policy.retry_after
        attempts = self._failed_starts[version] = self._failed_starts.get(version, 0) + 1
        active = self._active
        still = (
            f"still serving version {active.version}"
            if active is not None and active.serving()
            else "nothing is served"
        )
        if attempts == 1:
            logger.error(
                "version %s of %s (%s) failed to start on %s: %s; %s; retrying in %.0fs. "
                "Its log: %s, ending:\n%s",
                version,
                self.model_name,
                role,
                where,
                exc,
                still,
                self.policy.retry_after,
                log_path,
                _indent(ending),
            )
        else:
            logger.error(
                "version %s of %s (%s) failed to start again (attempt %d): %s; %s; retrying in "
                "%.0fs. Its log: %s",
                version,
                self.model_name,
                role,
                attempts,
                exc,
                still,
                self.policy.retry_after,
                log_path,
            )

    def _replicas(self) -> Iterator[Replica]:
        for slot in self.slots:
            yield from slot.replicas


class BackgroundServe:
    """Run :func:`serve`'s controller on a thread: for tests, notebooks and embedding.

    Example:
        >>> with BackgroundServe("wine", port=8081, replicas=2) as running:
        ...     running.wait_serving(timeout=60)
        ...     requests.post(running.url + "/invocations", json=...)
    """

    def __init__(self, model_name: str, port: int, **kwargs):
        self.controller = Controller(model_name, port, **kwargs)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"serve-{model_name}", daemon=True)

    @property
    def url(self) -> str:
        return self.controller.url

    def start(self) -> BackgroundServe:
        self._thread.start()
        return self

    def wait_serving(self, timeout: float) -> str:
        """Wait until some version serves; returns it (raises what the controller raised)."""
        deadline = time.monotonic() + timeout
        while not self.controller.serving.wait(0.2):
            self._raise_if_failed()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.controller.model_name} was not served in {timeout}s")
        return str(self.controller.serving_version)

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the controller did not stop within {timeout}s")
        self._raise_if_failed()

    def _run(self) -> None:
        try:
            self.controller.run(self._stop)
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> BackgroundServe:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, shutting_down: threading.Event) -> Iterator[None]:
    """On the main thread: the first SIGINT/SIGTERM asks for a clean stop, a second insists.

    Insisting interrupts whatever blocks (an MLflow call can retry a dead server
    for minutes); the cleanup that stops the children is never interrupted.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handle(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if shutting_down.is_set():
            logger.info("%s received; already stopping the model servers", name)
        elif stop.is_set():
            raise KeyboardInterrupt  # `run`'s `finally` still stops the children
        else:
            logger.info("%s received; stopping", name)
            stop.set()

    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _indent(text: str) -> str:
    return textwrap.indent(text, "    ")


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"
