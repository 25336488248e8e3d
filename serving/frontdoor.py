"""The front door: a Caddy reverse proxy whose configuration stays fixed while it serves.

Re-pointing Caddy through its admin API reloads the config, and a reload
closes idle client connections mid-race: under keep-alive load that dropped
4-7 of ~20,000 requests across two switches (DESIGN.md, "Serving semantics").
So the Caddyfile is written once: every replica of every version slot is an
upstream, Caddy actively probes each replica's health port, ``lb_policy
least_conn`` spreads requests over the healthy replicas, and the controller
switches versions by changing which slot's replicas answer healthy. The admin
API is off, so nothing can reload it.

Only what clients need is routed: ``POST /invocations`` and ``GET /ping``
(which answers 200 once some replica serves). Every other path, the replicas'
``/version`` and ``/health`` included, is answered 404 by the front door itself,
in the JSON shape of every other error.

Which requests are sent again to another replica (Caddy buffers each request
body, bounded by ``FrontDoorLimits.max_body_bytes``, so it can):

- one that never reached a replica (connection refused, no replica healthy
  yet): always, for up to ``FrontDoorTimings.try_duration``;
- one whose replica did not send its answer's headers within
  ``FrontDoorTimings.first_byte_timeout`` (a hung replica): once, to another
  replica (a request that is merely slow costs at most two replicas its time,
  never all of them). Scoring has no side effect, so the answer is the same;
  the timed-out replica is passed over for
  ``fail_duration``, leaves the rotation as soon as it misses its liveness pings
  (see ``serving._supervisor.Liveness``), and is replaced;
- one whose replica closed the connection before answering (the process died
  under it): sent on, by default (``resend_dropped``), because DESIGN.md's
  contract is that a replica dying drops no request. Caddy cannot tell a replica
  that was killed from one that a request killed, so a request of death would go
  on to a sibling; what bounds that risk is upstream of Caddy: the row cap and the
  concurrency bound (``serving._admission``) refuse the requests that could exhaust a
  replica, and the controller restarts a dead one. ``resend_dropped=False`` gives
  the other trade: the client gets a 502 in the JSON error shape instead.

Caddy tells the last two apart only by the time the request has taken
(``lb_retry_match`` sees the request, not the error): a request that reached a
replica is resent only while it is between one and two ``first_byte_timeout``
old, which a first timed-out attempt always is (a second one never) and the
attempt of a replica that died under its first try never is. (A request that
timed out once and then meets a replica dying under it in that window is
resent too.) Caddy 2.11 also matches ``lb_retry_match`` against each answer;
the status code it then sets keeps an answer from ever being resent.

Caddy retries only until an upstream's headers arrive, and forwards them at
once (``response_buffers`` changes neither), so each model server writes its
whole answer at once (``serving/_hold_answers.py``): a replica that dies
mid-answer has sent nothing, and the client gets a clean 502, never a 200 with
half a body.

Logs stay bounded: Caddy's own log is ``caddy.log``, rolled by Caddy at
``LOG_ROLL_MB`` (``LOG_ROLL_KEEP`` old files kept); its access log (one line per
request) is off unless ``access_log`` is asked for, and then rolled the same way.
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
# Caddy's own log (rolled by Caddy), its access log when asked for, and what the
# process itself prints before its logging is set up (a bad config, a panic).
LOG_FILE = "caddy.log"
ACCESS_LOG_FILE = "access.log"
PROCESS_LOG_FILE = "caddy-process.log"
LOG_ROLL_MB = 10
LOG_ROLL_KEEP = 3
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FrontDoorTimings:
    """How quickly the front door notices a routing change, and how long a request waits.

    Attributes:
        health_interval: how often Caddy probes each replica; a switch takes effect
            within about one interval.
        health_timeout: a probe slower than this counts as unhealthy.
        try_duration: how long a request waits for a healthy replica (or retries one
            that refused it) before the client gets a 503. Longer than twice
            ``first_byte_timeout``, so a request that timed out has its one resend.
        try_interval: pause between those tries.
        first_byte_timeout: a replica that has not sent an answer's headers this long
            after it got the request is given up on for that request (Caddy's
            ``response_header_timeout``), which is sent once to another replica. Every
            online request must be answered well within it (the row cap sees to that;
            large scoring jobs go to batch scoring).
        resend_dropped: also send on a request whose replica closed the connection
            before answering (it died under the request). Then a replica that is
            killed drops nothing, but a request that kills its replica is sent on to
            the next one (see the module docstring). On by default.
        fail_duration: after a request to a replica failed, Caddy passes that
            replica over for this long (the active health check takes over).
        upstream_keepalive: idle time after which Caddy closes a connection to a
            model server. Below uvicorn's 5 s keep-alive timeout, so Caddy never
            sends a request on a connection uvicorn is closing (the request would
            then need a retry).
        grace_period: on shutdown, how long in-flight requests may finish.
    """

    health_interval: float = 0.25
    health_timeout: float = 1.0
    try_duration: float = 5.0
    try_interval: float = 0.05
    first_byte_timeout: float = 2.0
    resend_dropped: bool = True
    fail_duration: float = 1.0
    upstream_keepalive: float = 2.0
    grace_period: float = 5.0


@dataclass(frozen=True)
class FrontDoorLimits:
    """What a client may send: bounded body size and time, so one client cannot pin a worker.

    Attributes:
        max_body_bytes: larger request bodies are answered 413 before a model sees them whole.
            Smaller ones are buffered whole, so a request can be retried on another replica.
        read_header: time allowed to send the request line and headers.
        read_body: time allowed to send the body.
        idle: how long an idle keep-alive client connection stays open.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    read_header: float = 10.0
    read_body: float = 30.0
    idle: float = 120.0


_TOO_LARGE_BODY = (
    '{"error_code": "REQUEST_TOO_LARGE", "message": "request body over the front door\'s '
    'limit of {limit} bytes; send fewer rows per request"}'
)
# MLflow's scoring server answers other content types with plain text; the front
# door answers them itself, in the same JSON shape as every other error.
_UNSUPPORTED_BODY = (
    '{"error_code": "UNSUPPORTED_MEDIA_TYPE", "message": "send Content-Type '
    'application/json, text/csv or application/vnd.apache.parquet"}'
)
# What a client gets when its replica died under the request, or did not answer in time.
_UPSTREAM_FAILED_BODY = (
    '{"error_code": "MODEL_SERVER_FAILED", "message": "the model server handling this request '
    "ended or did not answer in time ({err.status_code} {err.status_text}); the request may be "
    'sent again; see the log of stageflow serve"}'
)
# Only /invocations and /ping are routed to the replicas.
_NOT_FOUND_BODY = (
    '{"error_code": "ENDPOINT_NOT_FOUND", "message": "the front door answers POST /invocations '
    'and GET /ping only"}'
)
# What a client gets when no replica is healthy (nothing promoted yet, or every
# replica of the serving version crashed): JSON in the shape of MLflow's own errors.
_UNAVAILABLE_BODY = (
    '{"error_code": "SERVICE_UNAVAILABLE", "message": "no model version is ready to serve '
    'this request ({err.status_code} {err.status_text}); see the log of stageflow serve"}'
)


def render_caddyfile(
    port: int,
    slots: list[Slot],
    health_port: int,
    timings: FrontDoorTimings = FrontDoorTimings(),  # frozen, so safe to share
    limits: FrontDoorLimits = FrontDoorLimits(),  # frozen
    metrics_port: int | None = None,
    log_dir: Path | None = None,
    access_log: bool = False,
) -> str:
    """The whole, fixed front-door configuration.

    With ``metrics_port``, Caddy's Prometheus metrics (requests, durations and
    status codes; each upstream's health) are served at
    ``http://127.0.0.1:METRICS_PORT/metrics``. Caddy logs to rolled files in
    ``log_dir`` (to stderr without one); ``access_log`` adds one line per request.
    """
    upstreams = " ".join(
        f"{replica.address}:{replica.port}" for slot in slots for replica in slot.replicas
    )
    too_large = _TOO_LARGE_BODY.replace("{limit}", str(limits.max_body_bytes))
    metrics = (
        f"\nhttp://:{metrics_port} {{\n\tbind {HOST}\n\tmetrics /metrics\n}}\n"
        if metrics_port
        else ""
    )
    # The request's own age decides (see the module docstring); Caddy's CEL sees
    # the placeholder as a float. Caddy (2.11) also matches lb_retry_match against
    # every answer, where the status code is set: an answer is never resent.
    no_answer = "{http.reverse_proxy.status_code} == null"
    bound = round(timings.first_byte_timeout * 1000)
    age = "{http.request.duration_ms}"
    timed_out_once = f"{age} >= {bound}.0 && {age} < {2 * bound}.0"
    # Dropped (the replica died under it): sent on while younger than two bounds, so a
    # request that keeps killing replicas, or keeps timing out, stops within that window.
    resend = (
        f"{age} < {2 * bound}.0 && {no_answer}"
        if timings.resend_dropped
        else f"{timed_out_once} && {no_answer}"
    )
    access = (
        f"\tlog {{\n\t\toutput {_log_output(log_dir, ACCESS_LOG_FILE)}\n\t}}\n"
        if access_log
        else ""
    )
    return f"""\
{{
	admin off
	auto_https off
	persist_config off
	grace_period {_ms(timings.grace_period)}
	metrics
	servers {{
		timeouts {{
			read_header {_ms(limits.read_header)}
			read_body {_ms(limits.read_body)}
			idle {_ms(limits.idle)}
		}}
	}}
	log {{
		output {_log_output(log_dir, LOG_FILE)}
		# One line per probe of every unrouted replica, several a second; the
		# controller logs each switch instead.
		exclude http.handlers.reverse_proxy.health_checker.active
	}}
}}

http://:{port} {{
	bind {HOST}
{access}	request_body {{
		max_size {limits.max_body_bytes}
	}}
	@unsupported {{
		path /invocations
		not header Content-Type application/json*
		not header Content-Type text/csv*
		not header Content-Type application/vnd.apache.parquet*
	}}
	# Every answer carries X-Request-Id: the client's own, else one made here,
	# sent on to the replica (whose inference log records it) and set once on the
	# answer (deferred, so it replaces the replica's echo instead of doubling it).
	@no_request_id not header X-Request-Id *
	request_header @no_request_id X-Request-Id {{http.request.uuid}}
	header >X-Request-Id {{http.request.header.X-Request-Id}}
	# Clients need scoring and a liveness check; the replicas' /version, /health
	# and whatever else MLflow's app answers are not published.
	@unrouted not path /invocations /ping
	header @unrouted Content-Type application/json
	respond @unrouted `{_NOT_FOUND_BODY}` 404
	header @unsupported Content-Type application/json
	respond @unsupported `{_UNSUPPORTED_BODY}` 415
	reverse_proxy {upstreams} {{
		lb_policy least_conn
		lb_try_duration {_ms(timings.try_duration)}
		lb_try_interval {_ms(timings.try_interval)}
		# A request that reached a replica is sent again only if that replica did not
		# answer within first_byte_timeout (hung), and once; never one whose replica
		# died under it (see the module docstring). Needs the whole body kept.
		lb_retry_match {{
			method GET HEAD POST
			expression `{resend}`
		}}
		request_buffers {limits.max_body_bytes}
		fail_duration {_ms(timings.fail_duration)}
		health_uri {HEALTH_PATH}
		health_port {health_port}
		health_interval {_ms(timings.health_interval)}
		health_timeout {_ms(timings.health_timeout)}
		transport http {{
			keepalive {_ms(timings.upstream_keepalive)}
			response_header_timeout {_ms(timings.first_byte_timeout)}
		}}
	}}
	handle_errors 413 {{
		header X-Request-Id {{http.request.header.X-Request-Id}}
		header Content-Type application/json
		respond `{too_large}` 413
	}}
	handle_errors 502 504 {{
		header X-Request-Id {{http.request.header.X-Request-Id}}
		header Content-Type application/json
		respond `{_UPSTREAM_FAILED_BODY}` {{err.status_code}}
	}}
	handle_errors {{
		header X-Request-Id {{http.request.header.X-Request-Id}}
		header Content-Type application/json
		respond `{_UNAVAILABLE_BODY}` {{err.status_code}}
	}}
}}
{metrics}"""


def _log_output(log_dir: Path | None, name: str) -> str:
    """A Caddy log ``output``: a file rolled at ``LOG_ROLL_MB``, or stderr."""
    if log_dir is None:
        return "stderr"
    return (
        f'file "{log_dir / name}" {{\n\t\t\troll_size {LOG_ROLL_MB}MiB\n'
        f"\t\t\troll_keep {LOG_ROLL_KEEP}\n\t\t}}"
    )


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class FrontDoor:
    """One Caddy process on ``127.0.0.1:port`` in front of every replica of the version slots."""

    def __init__(
        self,
        port: int,
        slots: list[Slot],
        health_port: int,
        directory: Path,
        timings: FrontDoorTimings = FrontDoorTimings(),  # frozen
        limits: FrontDoorLimits = FrontDoorLimits(),  # frozen
        metrics_port: int | None = None,
        access_log: bool = False,
    ):
        self.port = port
        self.access_log = access_log
        self.limits = limits
        self.metrics_port = metrics_port
        self.slots = slots
        self.health_port = health_port
        self.directory = directory
        self.timings = timings
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.metrics_port else None

    @property
    def config_path(self) -> Path:
        return self.directory / CADDYFILE

    @property
    def log_path(self) -> Path:
        """Caddy's own log (rolled by Caddy)."""
        return self.directory / LOG_FILE

    @property
    def process_log_path(self) -> Path:
        """What the Caddy process printed outside its log: a config it refused, a panic."""
        return self.directory / PROCESS_LOG_FILE

    def ending(self, lines: int) -> str:
        """The last ``lines`` of Caddy's log and of its process output, for a log line."""
        return "\n".join(
            tail
            for path in (self.log_path, self.process_log_path)
            if (tail := processes.tail(path, lines=lines).strip())
        )

    def start(self) -> subprocess.Popen:
        """Write the config, start Caddy and wait until it listens.

        Raises:
            UsageError: the port is already taken.
            StageflowError: Caddy exited or did not listen in time (its log is named).
        """
        for port, option in ((self.port, "--port"), (self.metrics_port, "--metrics-port")):
            if port and processes.port_in_use(HOST, port):
                raise UsageError(
                    f"port {port} on {HOST} is already in use by another program; "
                    f"pick another with {option}"
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_caddyfile(
                self.port,
                self.slots,
                self.health_port,
                self.timings,
                self.limits,
                self.metrics_port,
                log_dir=self.directory,
                access_log=self.access_log,
            )
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
        self.proc = processes.spawn(command, log_path=self.process_log_path, env=env)
        try:
            processes.wait_until(
                lambda: processes.port_in_use(HOST, self.port),
                timeout=START_TIMEOUT_S,
                proc=self.proc,
                what=f"Caddy on {self.url}",
                log_path=self.process_log_path,
            )
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise StageflowError(f"the front door did not start: {exc}") from None
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> subprocess.Popen:
        """Start Caddy again on the same port with the same config, after it exited.

        Whatever the dead process left in its group is killed first: a child still
        holding the port would make the new one fail to listen.
        """
        self.stop()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop_group(self.proc.pid, timeout=self.timings.grace_period + 5)
