"""``stageflow serve``: keep the registry's Production version answering at one fixed address.

The controller runs a Caddy front door with a fixed configuration (see
:mod:`serving.frontdoor`) and gives each live version a *slot* of N replicas:
N single-worker ``mlflow models serve`` processes, each on its own loopback
address, among which the front door balances (see :mod:`serving._slots`).
Each runs its math libraries on one thread (replicas give the parallelism)
and loads the model with the ``model_config`` given to :func:`serve`.

It polls the registry and brings what runs in line with what it reads. Each
poll is observe → plan → execute:

- **observe**: read the registry's Production and Staging versions (or note
  that the tracking server is away), take every starting replica one step
  of its proof (``/ping``, then the version's own input example;
  :class:`serving._supervisor.Supervisor`), and read which proved replicas have
  stopped answering their liveness pings (:class:`serving._supervisor.Liveness`,
  on a thread of its own);
- **plan**: :func:`serving._planner.plan` turns that, and the clock, into
  actions — start a version as Production or Staging, switch to a proved one,
  stop one no longer needed, give up a failed start and retry it later,
  restart a replica. The rules (warm standby of the previous Production,
  Staging warmed ahead of its promotion, a cold version switched to once one
  replica proved itself, a failed start never routed and retried every
  ``SwitchPolicy.retry_after``, a dead replica restarted, the last known
  Production kept while the registry is away) are written down there;
- **execute**: :class:`serving._effects.Effects` carries the actions out: it
  starts processes, routes and unroutes slots by their health answer (a switch
  waits until the front door has probed the change), and stops servers with
  SIGTERM so uvicorn finishes what is in flight.

Starting servers never blocks the loop: each poll takes a starting replica one
step further, so a rollback is not held up by a version warming beside it.

At every moment some replica is healthy, so no request is dropped; a request
that arrives while none is (nothing promoted yet) waits up to
``FrontDoorTimings.try_duration`` for one.

The controller also supervises the front door: a Caddy that exits is started
again in place, on the same port with the same configuration (its clients see
refused connections for the second that takes); one that keeps dying
(``FRONT_DOOR_RESTARTS`` times within ``FRONT_DOOR_RESTART_WINDOW_S``) ends
``serve`` with its log named.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

import registry
from serving import _mirror, _planner, inference_log
from serving._effects import Effects
from serving._model_server import VERSION_HEADER
from serving._planner import ReplicaState, SlotState, SwitchPolicy
from serving._slots import HealthServer, Replica, Slot, make_slots
from serving._supervisor import LOG_TAIL_LINES, Liveness, Supervisor, indent
from serving.frontdoor import FrontDoor, FrontDoorTimings
from stageflow import manifest, processes, tracking
from stageflow.errors import StageflowError, TrackingServerUnreachable, UsageError

logger = logging.getLogger(__name__)

# Replicas by default: one per CPU core, since each prediction runs on one thread
# (OMP_NUM_THREADS=1); no more than this, since every replica holds its own copy
# of the model for each live version (serving, rollback standby, warm Staging).
DEFAULT_REPLICAS_CAP = 4
# How long one poll waits for the registry before it counts as away (a hung server).
REGISTRY_READ_TIMEOUT_S = 5.0
MAX_REPLICAS = 16
FRONT_DOOR_RESTARTS = 5
FRONT_DOOR_RESTART_WINDOW_S = 60.0
FRONT_DOOR_CHECK_S = 0.05
# A split Production shorter than this is a promotion between its writes: not worth a warning.
SPLIT_GRACE_SECONDS = 5.0
SHADOW_FILE = "shadow.json"

__all__ = [
    "VERSION_HEADER",
    "BackgroundServe",
    "Controller",
    "SwitchPolicy",
    "default_replicas",
    "serve",
]


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
    access_log: bool = False,
    shadow: bool = False,
) -> None:
    """Serve ``model_name``'s Production version on ``http://127.0.0.1:port`` until stopped.

    Each live version runs as ``replicas`` model server processes (default:
    :func:`default_replicas`). ``model_config`` is handed to every one of them
    as the pyfunc's ``model_config`` (MLflow's ``SERVING_MODEL_CONFIG``).
    Caddy's Prometheus metrics are served on ``http://127.0.0.1:METRICS_PORT/metrics``
    (a free port, logged at start, unless ``metrics_port`` names one).
    ``access_log`` turns on a line per request in the front door's ``access.log``
    (rolled) and in each replica's log (capped); both are off by default. With
    ``shadow``, every request Production answers (and logs) is mirrored, after its
    answer, to the warm Staging version, whose predictions are logged beside
    Production's as ``source=shadow`` (:mod:`serving._mirror`).

    Blocks until SIGINT/SIGTERM (when called on the main thread) or until
    ``stop_event`` is set, then stops the front door and every model server.

    Example:
        >>> serve("wine", port=8080, replicas=2)  # then: curl -X POST localhost:8080/invocations

    Raises:
        TrackingServerUnreachable: the tracking server did not answer at start, and no
            Production version served here before (with one, its verified local copy
            serves, and the log says so).
        UsageError: the port is already taken, or ``replicas`` is out of range.
        StageflowError: the front door could not start, or kept dying while serving.
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
        access_log=access_log,
        shadow=shadow,
    ).run(stop_event)


class Controller:
    """The loop behind :func:`serve`: observe the registry and the slots, plan, carry out.

    What it decides is :func:`serving._planner.plan`'s; what it does is
    :class:`serving._effects.Effects`' and :class:`serving._supervisor.Supervisor`'s.
    It owns the front door, the slots and their health server, and answers what
    serves: :attr:`serving_version`, :attr:`standby_version`, :attr:`staging_version`.
    """

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
        access_log: bool = False,
        shadow: bool = False,
    ):
        replicas = default_replicas() if replicas is None else replicas
        if not 1 <= replicas <= MAX_REPLICAS:
            raise UsageError(f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
        self.model_name = model_name
        self.port = port
        self.uri = tracking.resolve_uri(tracking_uri)
        self.poll_interval = poll_interval
        self.directory = (home or tracking.home()) / "serve" / f"{_file_safe(model_name)}-{port}"
        # Verified local copies of the versions served, and the last Production (manifest).
        self.home = home or tracking.home()
        self.timings = timings
        self.policy = policy
        self.metrics_port = metrics_port
        self.replicas = replicas
        self.access_log = access_log
        # Every replica logs what it answers unless the config turns the log off.
        self.model_config = inference_log.serving_config(model_config, home or tracking.home())
        # `--shadow`: the file naming the warm Staging replicas that Production's replicas
        # mirror answered requests to (serving/_mirror.py says why the mirror lives there).
        self.shadow_file: Path | None = None
        self._shadow_target: tuple[str | None, tuple[str, ...]] | None = None
        if shadow:
            log = self.model_config[inference_log.INFERENCE_LOG]
            if inference_log.parse_mode(log.get("mode", "all")) == 0.0:
                raise UsageError(
                    "--shadow logs the Staging version's predictions beside Production's: "
                    "it needs the inference log on (drop --inference-log off, or use sample:F)"
                )
            self.shadow_file = self.directory / SHADOW_FILE
            log["shadow_file"] = str(self.shadow_file)
        self.slots: list[Slot] = []
        self.front_door: FrontDoor | None = None
        self.started_pids: list[int] = []
        self.serving = threading.Event()
        self._client: MlflowClient | None = None
        self._health: HealthServer | None = None
        self._liveness: Liveness | None = None
        self._front_door_restarts: list[float] = []
        # Made once the slots exist (_start): they carry out the plans.
        self._effects: Effects | None = None
        # Live versions the last plan found unneeded (slot → version); see serving._planner.
        self._unneeded: dict[int, str] = {}
        self._registry_error: str | None = None
        self._said_waiting = False
        self._split: tuple[str, float, bool] | None = None  # why, since when, said so
        self._shutting_down = threading.Event()
        # The registry is read on a thread of its own, so a hung tracking server costs the
        # loop at most REGISTRY_READ_TIMEOUT_S once, not a poll's worth of every MLflow retry.
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry")
        self._reading: concurrent.futures.Future | None = None
        self._remembered: str | None = None

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
    def _active(self) -> Slot | None:
        """The slot routed as Production."""
        return self._effects.active if self._effects is not None else None

    @property
    def serving_version(self) -> str | None:
        active = self._active
        return active.version if active else None

    @property
    def standby_version(self) -> str | None:
        standby = self._effects.standby if self._effects is not None else None
        return standby.version if standby else None

    @property
    def staging_version(self) -> str | None:
        """The Staging version once it is warm (proved, unrouted) for its promotion."""
        warm = self._effects.warm if self._effects is not None else None
        return warm.version if warm else None

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Start, follow the registry until ``stop_event`` (or a signal), then stop everything."""
        stop = stop_event or threading.Event()
        with _stop_on_signals(stop, self._shutting_down):
            try:
                self._start()
                while not stop.is_set():
                    self._check_front_door()
                    self._poll(stop)
                    self._wait_for_next_poll(stop)
            except KeyboardInterrupt:  # a second signal insists
                pass
            finally:
                self._shutdown()

    def _wait_for_next_poll(self, stop: threading.Event) -> None:
        """Wait ``poll_interval``, or less if the front door exits meanwhile (it is restarted
        on the next poll, so its clients see refused connections for less time)."""
        deadline = time.monotonic() + self.poll_interval
        door = self.front_door
        while (remaining := deadline - time.monotonic()) > 0:
            if stop.wait(min(remaining, FRONT_DOOR_CHECK_S)) or (door and not door.alive()):
                return

    # -- start and stop ------------------------------------------------------

    def _start(self) -> None:
        try:
            self.uri = tracking.require_server(self.uri)
        except TrackingServerUnreachable as exc:
            last = manifest.last_production(self.model_name, self.home)
            if last is None:
                raise
            self._registry_error = str(exc)
            logger.warning(
                "the tracking server at %s does not answer; serving version %s of %s, the "
                "last Production seen here (%s), from its verified local copy in %s until "
                "it answers",
                self.uri,
                last.version,
                self.model_name,
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last.seen_at)),
                last.path,
            )
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.slots, health_port = make_slots(self.replicas)
        supervisor = Supervisor(
            self.model_name,
            self.uri,
            self.directory,
            self.model_config,
            self.started_pids,
            access_log=self.access_log,
        )
        self._effects = Effects(
            self.model_name,
            self.url,
            self.slots,
            supervisor,
            self.policy,
            self.timings,
            self._local_copy,
        )
        self._health = HealthServer(self.slots, health_port)
        self._health.start()
        self._liveness = Liveness(self.slots)
        self._liveness.start()
        self._publish_shadow()  # no shadow until Staging is warm (and none left from before)
        self.front_door = FrontDoor(
            self.port,
            self.slots,
            health_port,
            self.directory,
            self.timings,
            metrics_port=self.metrics_port or processes.free_port(),
            access_log=self.access_log,
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
        if self._liveness is not None:
            self._liveness.close()
        if self._effects is not None:
            self._effects.stop_all()
            self._publish_shadow()
        if self._health is not None:
            self._health.close()
        self._reader.shutdown(wait=False, cancel_futures=True)
        if self.front_door is not None or live:
            logger.info("stopped serving %s", self.model_name)

    def _check_front_door(self) -> None:
        """Start Caddy again in place if it exited; give up if it keeps exiting."""
        door = self.front_door
        if door is None or door.alive():
            return
        code = door.proc.returncode if door.proc else None
        now = time.monotonic()
        recent = [t for t in self._front_door_restarts if now - t < FRONT_DOOR_RESTART_WINDOW_S]
        self._front_door_restarts = [*recent, now]
        if len(recent) >= FRONT_DOOR_RESTARTS:
            logger.error(
                "the front door (Caddy) exited with code %s, %d times in %.0fs; giving up. "
                "Its log: %s, ending:\n%s",
                code,
                len(recent) + 1,
                FRONT_DOOR_RESTART_WINDOW_S,
                door.log_path,
                indent(door.ending(LOG_TAIL_LINES)),
            )
            raise StageflowError(
                f"the front door (Caddy) kept exiting (last code {code}); its log: {door.log_path}"
            )
        logger.error(
            "the front door (Caddy) exited with code %s; starting it again on %s (the model "
            "servers keep running). Its log: %s, ending:\n%s",
            code,
            self.url,
            door.log_path,
            indent(door.ending(LOG_TAIL_LINES)),
        )
        try:
            proc = door.restart()
        except StageflowError as exc:  # UsageError included: another program took the port
            logger.error("the front door did not start again: %s; trying again", exc)
            return
        self.started_pids.append(proc.pid)
        logger.info("the front door listens again on %s (Caddy pid %d)", self.url, proc.pid)

    # -- one poll: observe → plan → execute ------------------------------------

    def _poll(self, stop: threading.Event) -> None:
        effects = self._effects
        assert effects is not None, "_start makes the effects"
        stages = self._read_registry()
        effects.supervisor.prove(self.slots)
        effects.supervisor.cap_logs(self.slots)
        plan = _planner.plan(self._observe(stages), self.policy)
        self._unneeded = dict(plan.unneeded)
        for action in plan.actions:
            effects.carry_out(action, stop)
        self._publish_shadow()
        active = effects.active
        if active is not None and active.serving():
            self.serving.set()
            if active.version != self._remembered:
                # What serve falls back to if the tracking server is away at its next start.
                manifest.remember_production(self.model_name, str(active.version), self.home)
                self._remembered = active.version
        else:
            self.serving.clear()

    def _local_copy(self, version: str) -> Path:
        """The verified local copy of ``version`` its replicas serve (``stageflow.manifest``).

        While the registry is away, only a copy verified here before serves.
        """
        client = self._client if self._registry_error is None else None
        return manifest.local_copy(self.model_name, version, client, self.home)

    def _observe(self, stages: tuple[str | None, str | None, str | None] | None) -> _planner.State:
        """What the planner decides on: the registry's stages, the slots, and the clock."""
        effects = self._effects
        assert effects is not None, "_start makes the effects"
        now = time.monotonic()
        return _planner.State(
            now=now,
            registry=None if stages is None else _planner.RegistryState(*stages),
            slots=tuple(_slot_state(slot, now) for slot in self.slots),
            serving=effects.index(effects.active),
            standby=effects.index(effects.standby),
            warm=effects.index(effects.warm),
            unneeded=dict(self._unneeded),
            retry_at=dict(effects.retry_at),
        )

    def _read_registry(self) -> tuple[str | None, str | None, str | None] | None:
        """The registry's (Production, Staging, why Production is split); None if it is away.

        A read that has not answered within ``REGISTRY_READ_TIMEOUT_S`` (a hung, not
        dead, tracking server) counts as away, and no second read starts until it ends.
        While the registry is away and nothing serves yet, the last Production seen here
        stands in for it (its verified local copy serves).
        """
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = self._reader.submit(self._read_stages)
            try:
                stages = reading.result(timeout=REGISTRY_READ_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                stages = RegistryAway(f"it did not answer within {REGISTRY_READ_TIMEOUT_S:.0f}s")
        else:
            stages = RegistryAway("a read of it has not answered yet")
        if isinstance(stages, RegistryAway):
            self._note_registry_error(stages)
            last = manifest.last_production(self.model_name, self.home)
            if self._active is None and last is not None:
                return last.version, None, None
            return None
        if self._registry_error is not None:
            logger.info("the tracking server at %s answers again", self.uri)
            self._registry_error = None
        production, staging, split = stages
        self._note_split(split)
        if production is None:
            self._note_no_production()
        else:
            self._said_waiting = False
        return production, staging, split

    def _read_stages(self) -> tuple[str | None, str | None, str | None] | RegistryAway:
        """One read of the registry (on the reader thread); what went wrong, if it did."""
        try:
            if self.uri.startswith(("http://", "https://")) and not processes.http_ok(
                self.uri.rstrip("/") + "/health", timeout=2.0, verify=tracking.tls_verify()
            ):
                # Checked first: MLflow's client retries a dead server for minutes.
                raise ConnectionError("its /health does not answer")
            # One read of the aliases and the ledger's head, one of the stages. A version
            # moving from Staging to Production is named by one alias or the other at
            # every moment, so it stays live while Production is split mid-promotion.
            placed = registry.placements(self._client, self.model_name)
        except Exception as exc:  # noqa: BLE001 - whatever the registry did, keep serving what serves
            return RegistryAway(f"{type(exc).__name__}: {exc}")
        production, staging = placed[registry.PRODUCTION], placed[registry.STAGING]
        return production.candidate, staging.candidate, production.split

    def _note_split(self, split: str | None) -> None:
        """Say why Production is not followed, once it outlasts a promotion's own writes."""
        now = time.monotonic()
        if split is None:
            if self._split is not None and self._split[2]:
                logger.info("%s's Production is settled again; following it", self.model_name)
            self._split = None
            return
        if self._split is None or self._split[0] != split:
            self._split = (split, now, False)
        why, since, said = self._split
        if not said and now - since >= SPLIT_GRACE_SECONDS:
            logger.warning(
                "%s's Production is not settled (%s); %s; `stageflow status --model %s` "
                "names the fix",
                self.model_name,
                why,
                f"still serving version {self.serving_version}"
                if self._active
                else "serving nothing until it is",
                self.model_name,
            )
            self._split = (why, since, True)

    def _note_registry_error(self, away: RegistryAway) -> None:
        first = self._registry_error is None
        self._registry_error = str(away).splitlines()[0][:300]
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

    def _publish_shadow(self) -> None:
        """Under ``--shadow``: point Production's replicas at the warm Staging replicas.

        The shadow reuses the Staging version the controller keeps warm for its
        promotion (no extra servers), and only its proved, running replicas.
        """
        if self.shadow_file is None or self._effects is None:
            return
        warm, active = self._effects.warm, self._effects.active
        target: tuple[str | None, tuple[str, ...]] = (None, ())
        if warm is not None and warm is not active and warm.version is not None:
            urls = tuple(r.url for r in warm.replicas if r.ready and r.alive())
            if urls:
                target = (warm.version, urls)
        if target == self._shadow_target:
            return
        _mirror.publish(self.shadow_file, target[0], list(target[1]))
        self._shadow_target = target
        if target[0] is not None:
            logger.info(
                "shadow: requests answered by Production are mirrored to version %s (Staging) "
                "on %s",
                target[0],
                ", ".join(target[1]),
            )
        elif self.serving_version is not None:
            logger.info("shadow: no warm Staging version; nothing is mirrored")

    def _replicas(self) -> Iterator[Replica]:
        for slot in self.slots:
            yield from slot.replicas


class RegistryAway(Exception):  # a state handed back by the reader thread, not raised
    """Why one read of the registry got no answer."""


def _slot_state(slot: Slot, now: float) -> SlotState:
    """What the planner needs to know about ``slot``, read from its processes now."""
    return SlotState(
        version=slot.version,
        role=slot.role,
        proved=slot.proved,
        failure=slot.failure,
        routed=slot.routed,
        unrouted_at=slot.unrouted_at,
        replicas=tuple(
            ReplicaState(
                running=replica.proc is not None,
                alive=replica.alive(),
                ready=replica.ready,
                failure=replica.failure,
                retry_at=replica.retry_at,
                silent_for=(
                    now - replica.answered_at if replica.ready and not replica.responsive() else 0.0
                ),
            )
            for replica in slot.replicas
        ),
    )


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
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
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


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"
