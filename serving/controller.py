"""``stageflow serve``: keep the registry's Production version answering at one fixed address.

The controller runs a Caddy front door with a fixed configuration (see
:mod:`serving.frontdoor`) and one ``mlflow models serve`` per live version, each
on its own loopback slot. It polls the registry; when Production changes
(promotion or rollback) it starts the new version on a free slot, proves it
answers ``/ping`` and its own input example, and only then switches:

1. route the new slot, and wait until the front door has probed it healthy;
2. unroute the old slot, and wait until the front door has probed it unhealthy;
3. give requests already sent to the old slot time to finish (drain);
4. stop the old server (SIGTERM: uvicorn finishes what is in flight).

At every moment at least one slot is healthy, so no request is dropped; a
request that arrives while none is (nothing promoted yet) waits up to
``FrontDoorTimings.try_duration`` for one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

import registry
from serving import _model_server
from serving._model_server import VERSION_HEADER, Stopping
from serving._slots import HealthServer, Slot, make_slots
from serving.frontdoor import FrontDoor, FrontDoorTimings
from stageflow import processes, tracking
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 8

__all__ = ["VERSION_HEADER", "BackgroundServe", "Controller", "SwitchPolicy", "serve"]


@dataclass(frozen=True)
class SwitchPolicy:
    """How the controller paces itself.

    Attributes:
        probe_wait: longest wait for the front door to probe a slot after its
            answer changed (a few health intervals).
        drain: time left for requests already sent to the old slot before it stops.
        retry_after: after a version failed to start, wait this long before trying again.
    """

    probe_wait: float = 5.0
    drain: float = 1.0
    retry_after: float = 30.0


def serve(
    model_name: str,
    port: int = 8080,
    tracking_uri: str | None = None,
    poll_interval: float = 1.0,
    home: Path | None = None,
    stop_event: threading.Event | None = None,
    metrics_port: int | None = None,
) -> None:
    """Serve ``model_name``'s Production version on ``http://127.0.0.1:port`` until stopped.

    Caddy's Prometheus metrics are served on ``http://127.0.0.1:METRICS_PORT/metrics``
    (a free port, logged at start, unless ``metrics_port`` names one).

    Blocks until SIGINT/SIGTERM (when called on the main thread) or until
    ``stop_event`` is set, then stops the front door and every model server.

    Example:
        >>> serve("wine", port=8080)  # then: curl -X POST localhost:8080/invocations ...

    Raises:
        TrackingServerUnreachable: the tracking server did not answer at start.
        UsageError: the port is already taken.
        StageflowError: the front door could not start or died while serving.
    """
    Controller(model_name, port, tracking_uri, poll_interval, home, metrics_port=metrics_port).run(
        stop_event
    )


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
    ):
        self.model_name = model_name
        self.port = port
        self.uri = tracking.resolve_uri(tracking_uri)
        self.poll_interval = poll_interval
        self.directory = (home or tracking.home()) / "serve" / f"{_file_safe(model_name)}-{port}"
        self.timings = timings
        self.policy = policy
        self.metrics_port = metrics_port
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
        self._retry_at: dict[str, float] = {}
        self._failed_starts: dict[str, int] = {}
        self._registry_error: str | None = None
        self._said_waiting = False
        self._reported_exit: subprocess.Popen | None = None
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
        found += [(slot.address, slot.port) for slot in self.slots]
        if self._health is not None:
            found += [(slot.address, self._health.port) for slot in self.slots]
        return found

    @property
    def serving_version(self) -> str | None:
        return self._active.version if self._active else None

    @property
    def standby_version(self) -> str | None:
        return self._standby.version if self._standby else None

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
            except (Stopping, KeyboardInterrupt):  # asked to stop (a second signal insists)
                pass
            finally:
                self._shutdown()

    # -- start and stop ------------------------------------------------------

    def _start(self) -> None:
        self.uri = tracking.require_server(self.uri)
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.slots, health_port = make_slots()
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
            "front door for %s listening on %s (Caddy pid %d; slots %s; health port %d; "
            "metrics %s; config and logs in %s)",
            self.model_name,
            self.url,
            proc.pid,
            ", ".join(f"{s.address}:{s.port}" for s in self.slots),
            health_port,
            self.front_door.metrics_url,
            self.directory,
        )

    def _shutdown(self) -> None:
        self._shutting_down.set()
        self.serving.clear()
        live = [slot for slot in self.slots if slot.proc is not None]
        if self.front_door is not None or live:
            logger.info(
                "stopping %s's front door and %d model server(s)", self.model_name, len(live)
            )
        # The front door first, so nothing new reaches a model server that is stopping.
        if self.front_door is not None:
            self.front_door.stop()
        for slot in live:
            _model_server.stop(slot)
        if self._health is not None:
            self._health.close()
        self._active = None
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

    # -- following the registry ------------------------------------------------

    def _poll(self, stop: threading.Event) -> None:
        self._check_standby()
        wanted = self._production_version()
        if wanted is None:
            return
        active = self._active
        if active is not None and active.version == wanted:
            if active.alive():
                return
            self._report_exit(active)
        if time.monotonic() < self._retry_at.get(wanted, 0.0):
            return
        self._switch_to(wanted, stop)

    def _check_standby(self) -> None:
        standby = self._standby
        if standby is not None and not standby.alive():
            logger.warning(
                "the warm standby (version %s on slot %s) exited with code %s; a switch back "
                "to it will start it cold. Its log: %s",
                standby.version,
                standby.address,
                standby.proc.returncode if standby.proc else None,
                standby.log_path,
            )
            _model_server.stop(standby)
            self._standby = None

    def _report_exit(self, slot: Slot) -> None:
        """Say once that the serving version's server died; the poll restarts it."""
        if self._reported_exit is slot.proc:
            return
        self._reported_exit = slot.proc
        self.serving.clear()
        logger.error(
            "version %s's model server on slot %s exited with code %s; nothing is served "
            "until it restarts. Its log: %s, ending:\n%s",
            slot.version,
            slot.address,
            slot.proc.returncode if slot.proc else None,
            slot.log_path,
            _indent(processes.tail(slot.log_path, lines=LOG_TAIL_LINES)),
        )

    def _production_version(self) -> str | None:
        """The registry's Production version; None if there is none or the registry is away."""
        try:
            if self.uri.startswith(("http://", "https://")) and not processes.http_ok(
                self.uri.rstrip("/") + "/health", timeout=2.0
            ):
                # Checked first: MLflow's client retries a dead server for minutes.
                raise ConnectionError("its /health does not answer")
            wanted = registry.current_version(self._client, self.model_name, registry.PRODUCTION)
        except Exception as exc:  # whatever the registry did, keep serving what serves
            self._note_registry_error(exc)
            return None
        if self._registry_error is not None:
            logger.info("the tracking server at %s answers again", self.uri)
            self._registry_error = None
        if wanted is None:
            self._note_no_production()
        else:
            self._said_waiting = False
        return wanted

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
                "cannot read %s's Production version from the tracking server at %s (%s); "
                "%s; will keep trying",
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

    # -- switching -----------------------------------------------------------------

    def _switch_to(self, version: str, stop: threading.Event) -> None:
        old = self._active
        standby = self._standby
        warm = standby is not None and standby.version == version and standby.alive()
        slot = standby if warm else next(s for s in self.slots if s.is_free())
        if warm:
            logger.info(
                "Production changed %s → %s: version %s is warm on slot %s; switching",
                old.version if old else None,
                version,
                version,
                slot.address,
            )
        elif self._failed_starts.get(version):
            logger.info("retrying version %s on slot %s", version, slot.address)
        elif old is None:
            logger.info(
                "Production of %s is version %s: starting it on slot %s",
                self.model_name,
                version,
                slot.address,
            )
        elif old.version == version:
            logger.info("restarting version %s on slot %s", version, slot.address)
        else:
            logger.info(
                "Production changed %s → %s: starting version %s on slot %s",
                old.version,
                version,
                version,
                slot.address,
            )
        began = time.monotonic()
        try:
            if not warm:
                log_path = self.directory / f"v{version}-slot-{slot.address}.log"
                _model_server.start(self.model_name, version, slot, self.uri, log_path)
                self.started_pids.append(slot.proc.pid)
            _model_server.prove_ready(self.model_name, slot, stop)
        except Stopping:
            raise
        except Exception as exc:  # any failure keeps the old version serving
            if warm:
                self._standby = None
            self._give_up_on(slot, version, exc, old)
            return
        ready_in = time.monotonic() - began

        # 1. Route the new slot; both may now take traffic, and both are good.
        slot.routed = True
        if slot.wait_seen(healthy=True, timeout=self.policy.probe_wait):
            # Let Caddy record that probe before the old slot starts answering 503.
            stop.wait(self.timings.try_interval)
        else:
            logger.warning("the front door has not probed slot %s yet", slot.address)
        # 2. Unroute the old one; from the next probe on, everything goes to the new slot.
        if old is not None:
            old.routed = False
            old.wait_seen(healthy=False, timeout=self.policy.probe_wait)
        self._active = slot
        if self._standby is slot:
            self._standby = None
        self._retry_at.pop(version, None)
        self._failed_starts.pop(version, None)
        self.serving.set()
        took = time.monotonic() - began
        if old is None:
            logger.info(
                "serving %s version %s on %s (ready in %.1fs)",
                self.model_name,
                version,
                self.url,
                took,
            )
            return
        logger.info(
            "switched %s to version %s in %.1fs (server ready in %.1fs); version %s on slot %s "
            "no longer takes new requests",
            self.model_name,
            version,
            took,
            ready_in,
            old.version,
            old.address,
        )
        # 3. Keep the old server warm and unrouted as the rollback standby (requests
        # already sent to it finish there), replacing the previous standby; or, when
        # the old server is the same version or dead, drain it and 4. stop it.
        previous_standby = self._standby
        if old.version != version and old.alive():
            self._standby = old
            logger.info("version %s stays warm on slot %s for a rollback", old.version, old.address)
            if previous_standby is not None and previous_standby is not slot:
                replaced = previous_standby.version
                _model_server.stop(previous_standby)
                logger.info("stopped version %s (no longer the rollback standby)", replaced)
        else:
            stop.wait(self.policy.drain)
            old_version, old_address = old.version, old.address
            _model_server.stop(old)
            logger.info("stopped version %s (slot %s)", old_version, old_address)

    def _give_up_on(self, slot: Slot, version: str, exc: Exception, old: Slot | None) -> None:
        log_path = slot.log_path
        _model_server.stop(slot)
        self._retry_at[version] = time.monotonic() + self.policy.retry_after
        attempts = self._failed_starts[version] = self._failed_starts.get(version, 0) + 1
        still = (
            f"still serving version {old.version}" if old and old.alive() else "nothing is served"
        )
        if attempts == 1:
            logger.error(
                "version %s of %s failed to start on slot %s: %s; %s; retrying in %.0fs. "
                "Its log: %s, ending:\n%s",
                version,
                self.model_name,
                slot.address,
                exc,
                still,
                self.policy.retry_after,
                log_path,
                _indent(processes.tail(log_path, lines=LOG_TAIL_LINES)),
            )
        else:
            logger.error(
                "version %s of %s failed to start again (attempt %d): %s; %s; retrying in "
                "%.0fs. Its log: %s",
                version,
                self.model_name,
                attempts,
                exc,
                still,
                self.policy.retry_after,
                log_path,
            )


class BackgroundServe:
    """Run :func:`serve`'s controller on a thread: for tests, notebooks and embedding.

    Example:
        >>> with BackgroundServe("wine", port=8081) as running:
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
