"""Version slots and their replicas: a loopback address per model server, and its health answer.

Caddy's configuration never changes while it serves (a reload drops requests
under keep-alive load; DESIGN.md, "Serving semantics"). A *slot* is the place
of one live version; it holds that version's *replicas*, each one
``mlflow models serve`` process on a loopback address of its own (127.0.0.2,
127.0.0.3, …). Caddy lists every replica of every slot as an upstream and asks
each replica's address on the health port whether it may take traffic; the
controller routes a version by changing that answer for its whole slot.

A replica answers healthy only while its slot is routed, its server has proved
that it answers (``/ping`` and the version's input example), its process is
alive, and it answered its last liveness ping (``serving._supervisor.Liveness``).
So a crashed or hung replica leaves the rotation within about a second on its
own while its siblings keep serving, and a restarted one rejoins only once it
has proved itself again.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stageflow.errors import StageflowError

# Four slots: the serving version, the previous Production kept warm for a
# rollback, the Staging version warmed for its promotion, and one being started.
SLOT_COUNT = 4
FIRST_ADDRESS = ipaddress.IPv4Address("127.0.0.2")
LAST_ADDRESS = ipaddress.IPv4Address("127.0.0.254")
HEALTH_PATH = "/slot-health"
PORT_ATTEMPTS = 20
# An idle connection to the health port is closed after this long, so a client
# that opens connections and sends nothing cannot pin a thread each; the front
# door probes every replica several times a second on connections it keeps busy.
HEALTH_IDLE_TIMEOUT_S = 10.0


@dataclass(eq=False)
class Replica:
    """One upstream of the front door: a fixed address and port, and the process there now."""

    address: str
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    # Proved: answered /ping and the version's input example since it last started.
    ready: bool = False
    started_at: float = 0.0
    # After a failed restart, the next attempt waits until then (time.monotonic()).
    retry_at: float = 0.0
    # Why its last proof step failed, until the controller acts on it.
    failure: str | None = None
    # Liveness, once proved: when it last answered a ping, and how many pings in a
    # row it has missed since (serving._supervisor.Liveness).
    answered_at: float = 0.0
    missed_pings: int = 0
    _probed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _last_probe: tuple[float, bool] = (0.0, False)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        proc = self.proc  # read once: the health server asks while the controller changes it
        return proc is not None and proc.poll() is None

    def exit_code(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def clear(self) -> None:
        self.proc, self.log_path, self.ready, self.failure = None, None, False, None
        self.started_at = self.retry_at = self.answered_at = 0.0
        self.missed_pings = 0

    def responsive(self) -> bool:
        """It answered its last liveness ping (or has not been pinged since it proved itself)."""
        return self.missed_pings == 0

    def record_probe(self, answer: bool) -> None:
        with self._probed:
            self._last_probe = (time.monotonic(), answer)
            self._probed.notify_all()

    def wait_probe(self, healthy: bool, since: float, deadline: float) -> bool:
        """Wait for a probe after ``since`` answered ``healthy``; False at ``deadline``."""
        with self._probed:
            while not (self._last_probe[0] > since and self._last_probe[1] == healthy):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._probed.wait(remaining)
        return True


@dataclass(eq=False)
class Slot:
    """The place of one live version: its replicas, and whether the front door routes to it."""

    replicas: list[Replica]
    version: str | None = None
    # Why the controller started it ("Production" or "Staging"), for its log lines.
    role: str = ""
    routed: bool = False
    # A replica proved ready: the slot may be routed. From then on a replica that
    # dies or fails its proof is restarted in place, where before it meant the
    # version failed to start.
    proved: bool = False
    example: str | None = None
    started_at: float = 0.0
    unrouted_at: float = 0.0
    # Why starting the version failed, and the log that tells more, until the
    # controller gives it up (see serving._planner.GiveUp).
    failure: str | None = None
    failure_log: Path | None = None
    # The version's verified local copy every replica serves (stageflow.manifest).
    model_dir: Path | None = None

    @property
    def where(self) -> str:
        """The slot's addresses, for log lines."""
        return ", ".join(replica.address for replica in self.replicas)

    @property
    def pids(self) -> list[int]:
        return [replica.pid for replica in self.replicas if replica.pid is not None]

    def alive(self) -> bool:
        """Some replica's process still runs."""
        return any(replica.alive() for replica in self.replicas)

    def ready(self) -> bool:
        """Every replica has proved itself and still runs: the slot may be routed."""
        return all(replica.ready and replica.alive() for replica in self.replicas)

    def serving(self) -> int:
        """How many replicas the front door may send requests to right now."""
        return sum(self.healthy(replica) for replica in self.replicas)

    def healthy(self, replica: Replica) -> bool:
        """What ``replica``'s health port answers: routed, proved, running and answering."""
        return self.routed and replica.ready and replica.alive() and replica.responsive()

    def is_free(self) -> bool:
        return self.version is None and not any(replica.proc for replica in self.replicas)

    def clear(self) -> None:
        self.version, self.role, self.routed, self.proved = None, "", False, False
        self.example, self.failure, self.failure_log = None, None, None
        self.model_dir = None
        self.started_at = self.unrouted_at = 0.0
        for replica in self.replicas:
            replica.clear()

    def wait_seen(self, healthy: bool, timeout: float) -> bool:
        """Wait until the front door has probed the slot's replicas and heard ``healthy``.

        With ``healthy=True`` it waits for the replicas that answer healthy now
        (a replica that died meanwhile cannot); with False, for every replica.

        Returns:
            False if some replica was not probed so within ``timeout``.
        """
        since = time.monotonic()
        deadline = since + timeout
        expected = [r for r in self.replicas if not healthy or self.healthy(r)]
        return all(replica.wait_probe(healthy, since, deadline) for replica in expected)


def addresses(count: int) -> list[str]:
    """``count`` loopback addresses from 127.0.0.2 on (Linux routes all of 127.0.0.0/8)."""
    if FIRST_ADDRESS + (count - 1) > LAST_ADDRESS:
        raise StageflowError(f"{count} loopback addresses do not fit in 127.0.0.2-254")
    return [str(FIRST_ADDRESS + i) for i in range(count)]


def make_slots(replicas: int, count: int = SLOT_COUNT) -> tuple[list[Slot], int]:
    """``count`` slots of ``replicas`` replicas each, every replica on its own address.

    Returns:
        The slots, and a health port free on every replica's address.

    Raises:
        StageflowError: the addresses cannot be bound (only 127.0.0.1 exists on
            this machine's loopback interface), naming the fix.
    """
    taken = addresses(count * replicas)
    slots = [
        Slot([Replica(address, _free_port(address, taken)) for address in group])
        for group in (taken[i : i + replicas] for i in range(0, len(taken), replicas))
    ]
    for _ in range(PORT_ATTEMPTS):
        candidate = _free_port(taken[0], taken)
        if all(_bindable(address, candidate) for address in taken):
            return slots, candidate
    raise StageflowError(f"found no port free on all of {taken[0]} … {taken[-1]}")


def _free_port(address: str, taken: list[str]) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                last = taken[-1].rsplit(".", 1)[1]
                raise StageflowError(
                    f"cannot listen on {address}: serving puts each model server on its own "
                    f"loopback address ({taken[0]} … {taken[-1]}); on macOS add them with "
                    f"`for i in $(seq 2 {last}); do sudo ifconfig lo0 alias 127.0.0.$i up; done`"
                ) from None
            raise
        return sock.getsockname()[1]


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
        return True


class HealthServer:
    """Answers the front door's health probes on ``port`` of every replica's address."""

    def __init__(self, slots: list[Slot], port: int, idle_timeout: float = HEALTH_IDLE_TIMEOUT_S):
        self.slots = slots
        self.port = port
        self.idle_timeout = idle_timeout
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for slot in self.slots:
            for replica in slot.replicas:
                server = ThreadingHTTPServer(
                    (replica.address, self.port), _handler(slot, replica, self.idle_timeout)
                )
                server.daemon_threads = True
                thread = threading.Thread(
                    target=server.serve_forever,
                    name=f"replica-health-{replica.address}",
                    daemon=True,
                )
                thread.start()
                self._servers.append(server)
                self._threads.append(thread)

    def close(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.shutdown()
                server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()


def _handler(slot: Slot, replica: Replica, idle_timeout: float) -> type[BaseHTTPRequestHandler]:
    class ReplicaHealth(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The socket's timeout: a connection that sends nothing this long is closed.
        timeout = idle_timeout

        def do_GET(self) -> None:
            healthy = slot.healthy(replica)
            body = (f"version {slot.version}\n" if healthy else "not routed\n").encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            replica.record_probe(healthy)

        def log_message(self, format: str, *args) -> None:
            """Quiet: the front door probes every replica several times a second."""

    return ReplicaHealth
