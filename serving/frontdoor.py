"""The front door: a Caddy reverse proxy whose configuration stays fixed while it serves.

Re-pointing Caddy through its admin API reloads the config, and a reload
closes idle client connections mid-race: under keep-alive load that dropped
4-7 of ~20,000 requests across two switches (DESIGN.md, "Serving semantics").
So the Caddyfile is written once: every version slot is an upstream, Caddy
actively probes each slot's health port, ``lb_policy first`` sends traffic to
the first healthy slot, and the controller switches versions by changing which
slot answers healthy. The admin API is off, so nothing can reload it.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from serving._slots import HEALTH_PATH, Slot
from stageflow import processes
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CADDYFILE = "Caddyfile"
LOG_FILE = "caddy.log"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FrontDoorTimings:
    """How quickly the front door notices a slot change, and how long a request waits for one.

    Attributes:
        health_interval: how often Caddy probes each slot; a switch takes effect
            within about one interval.
        health_timeout: a probe slower than this counts as unhealthy.
        try_duration: how long a request waits for a healthy slot (or retries a
            refused connection) before the client gets a 503.
        try_interval: pause between those tries.
        upstream_keepalive: idle time after which Caddy closes a connection to a
            model server. Below uvicorn's 5 s keep-alive timeout, so Caddy never
            sends a request on a connection uvicorn is closing (a POST on such a
            connection cannot be retried and would fail as a 502).
        grace_period: on shutdown, how long in-flight requests may finish.
    """

    health_interval: float = 0.25
    health_timeout: float = 1.0
    try_duration: float = 5.0
    try_interval: float = 0.05
    upstream_keepalive: float = 2.0
    grace_period: float = 5.0


# What a client gets when no slot is healthy (nothing promoted yet, or the
# serving version crashed): JSON in the shape of MLflow's own errors.
_UNAVAILABLE_BODY = (
    '{"error_code": "SERVICE_UNAVAILABLE", "message": "no model version is ready to serve '
    'this request ({err.status_code} {err.status_text}); see the log of stageflow serve"}'
)


def render_caddyfile(
    port: int,
    slots: list[Slot],
    health_port: int,
    timings: FrontDoorTimings = FrontDoorTimings(),  # noqa: B008 - frozen, so safe to share
) -> str:
    """The whole, fixed front-door configuration."""
    upstreams = " ".join(f"{slot.address}:{slot.port}" for slot in slots)
    return f"""\
{{
	admin off
	auto_https off
	persist_config off
	grace_period {_ms(timings.grace_period)}
	log {{
		output stderr
		# One line per probe of every unrouted slot, several a second; the
		# controller logs each switch instead.
		exclude http.handlers.reverse_proxy.health_checker.active
	}}
}}

http://:{port} {{
	bind {HOST}
	reverse_proxy {upstreams} {{
		lb_policy first
		lb_try_duration {_ms(timings.try_duration)}
		lb_try_interval {_ms(timings.try_interval)}
		health_uri {HEALTH_PATH}
		health_port {health_port}
		health_interval {_ms(timings.health_interval)}
		health_timeout {_ms(timings.health_timeout)}
		transport http {{
			keepalive {_ms(timings.upstream_keepalive)}
		}}
	}}
	handle_errors {{
		header Content-Type application/json
		respond `{_UNAVAILABLE_BODY}` {{err.status_code}}
	}}
}}
"""


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class FrontDoor:
    """One Caddy process on ``127.0.0.1:port`` in front of the version slots."""

    def __init__(
        self,
        port: int,
        slots: list[Slot],
        health_port: int,
        directory: Path,
        timings: FrontDoorTimings = FrontDoorTimings(),  # noqa: B008 - frozen
    ):
        self.port = port
        self.slots = slots
        self.health_port = health_port
        self.directory = directory
        self.timings = timings
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / CADDYFILE

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    def start(self) -> subprocess.Popen:
        """Write the config, start Caddy and wait until it listens.

        Raises:
            UsageError: the port is already taken.
            StageflowError: Caddy exited or did not listen in time (its log is named).
        """
        if processes.port_in_use(HOST, self.port):
            raise UsageError(
                f"port {self.port} on {HOST} is already in use by another program; "
                "pick another with --port"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_caddyfile(self.port, self.slots, self.health_port, self.timings)
        )
        # Caddy keeps state under XDG folders (certificates, autosaved config);
        # keep it beside our logs instead of in the user's home.
        env = processes.venv_env(
            {
                "XDG_DATA_HOME": str(self.directory / "caddy-data"),
                "XDG_CONFIG_HOME": str(self.directory / "caddy-config"),
            }
        )
        command = [
            processes.bin_path("caddy"),
            "run",
            "--config",
            str(self.config_path),
            "--adapter",
            "caddyfile",
        ]
        self.proc = processes.spawn(command, log_path=self.log_path, env=env)
        try:
            processes.wait_until(
                lambda: processes.port_in_use(HOST, self.port),
                timeout=START_TIMEOUT_S,
                proc=self.proc,
                what=f"Caddy on {self.url}",
                log_path=self.log_path,
            )
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise StageflowError(f"the front door did not start: {exc}") from None
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop_group(self.proc.pid, timeout=self.timings.grace_period + 5)
