"""Version slots: one loopback address per live model server, and the health answer for each.

Caddy's configuration never changes while it serves (a reload drops requests
under keep-alive load; DESIGN.md, "Serving semantics"). It lists every slot as
an upstream and asks each slot's health port which ones may take traffic; the
controller routes by changing that answer. A slot answers healthy only while
the controller routes to it *and* its model server process is alive, so a
crashed server leaves the rotation within one health interval on its own.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stageflow.errors import StageflowError

# Three slots: the serving version, the one being started, and room for one
# more while the previous one drains.
SLOT_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
HEALTH_PATH = "/slot-health"
PORT_ATTEMPTS = 20


@dataclass
class Slot:
    """One upstream of the front door: a fixed address and port, and what runs there now."""

    address: str
    port: int
    version: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    routed: bool = False
    _probed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _last_probe: tuple[float, bool] = (0.0, False)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """What the health port answers: routed here and the model server still runs."""
        return self.routed and self.alive()

    def is_free(self) -> bool:
        return self.proc is None and not self.routed

    def clear(self) -> None:
        self.version, self.proc, self.log_path, self.routed = None, None, None, False

    def record_probe(self, answer: bool) -> None:
        with self._probed:
            self._last_probe = (time.monotonic(), answer)
            self._probed.notify_all()

    def wait_seen(self, healthy: bool, timeout: float) -> bool:
        """Wait until the front door probes this slot and gets ``healthy`` as the answer.

        Returns:
            False if no such probe came within ``timeout``.
        """
        since = time.monotonic()
        deadline = since + timeout
        with self._probed:
            while not (self._last_probe[0] > since and self._last_probe[1] == healthy):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._probed.wait(remaining)
        return True


def make_slots() -> tuple[list[Slot], int]:
    """A slot per address, each with a free model port, and a health port free on all of them.

    Raises:
        StageflowError: the slot addresses cannot be bound (only 127.0.0.1 exists on
            this machine's loopback interface), naming the fix.
    """
    slots = [Slot(address, _free_port(address)) for address in SLOT_ADDRESSES]
    for _ in range(PORT_ATTEMPTS):
        candidate = _free_port(SLOT_ADDRESSES[0])
        if all(_bindable(address, candidate) for address in SLOT_ADDRESSES):
            return slots, candidate
    raise StageflowError(f"found no port free on all of {', '.join(SLOT_ADDRESSES)}")


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StageflowError(
                    f"cannot listen on {address}: serving puts each model version on its own "
                    f"loopback address ({', '.join(SLOT_ADDRESSES)}); on macOS add them with "
                    "`sudo ifconfig lo0 alias 127.0.0.2 up` (and .3, .4)"
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
    """Answers the front door's health probes on ``health_port`` of every slot address."""

    def __init__(self, slots: list[Slot], port: int):
        self.slots = slots
        self.port = port
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for slot in self.slots:
            server = ThreadingHTTPServer((slot.address, self.port), _handler_for(slot))
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever,
                name=f"slot-health-{slot.address}",
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


def _handler_for(slot: Slot) -> type[BaseHTTPRequestHandler]:
    class SlotHealth(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            healthy = slot.healthy()
            body = (f"version {slot.version}\n" if healthy else "not routed\n").encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            slot.record_probe(healthy)

        def log_message(self, format: str, *args) -> None:
            """Quiet: the front door probes every slot several times a second."""

    return SlotHealth
