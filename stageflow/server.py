"""The embedded tracking server: a real ``mlflow server`` on 127.0.0.1.

Defaults: SQLite backend in WAL mode and proxied artifacts, both under
``STAGEFLOW_HOME`` (``./.stageflow``). ``start`` reuses a healthy server it
already runs; ``stop`` stops its whole process group and forgets it — after checking
that the recorded pid is still the server it started (its start time, recorded in
``server.json``), so a stale file never signals an unrelated process that reused the pid.

One uvicorn worker on purpose: ``mlflow server`` defaults to four, and uvicorn
with more than one worker leaves Nagle's algorithm on for keep-alive
connections (Kludex/uvicorn#3149), which adds ~40 ms to every tracking call.
SQLite serialises writes anyway, so more workers buy little for one writer.

Two more settings keep a tracking call fast (``server_env``; BENCHMARKS.md,
"Tracking latency"):

- MLflow's job execution is off. It serves GenAI features Stageflow does not use
  (scorer jobs, prompt optimisation, trace archival), and it costs a job runner
  and seven huey consumers, ~250 MB each, whose start-up takes tens of CPU
  seconds *after* ``/health`` already answers: on a two-core machine that made
  the first half-minute of tracking calls several times slower. Its consumers
  also take seconds to exit on SIGTERM.
- SQLite runs with ``synchronous=NORMAL`` on every connection the server opens,
  through ``_sqlite_tuning/sitecustomize.py`` on the server's ``PYTHONPATH``:
  with WAL, a commit then no longer waits for an fsync.

Either can be turned back on from the caller's environment:
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true``, ``STAGEFLOW_SQLITE_SYNCHRONOUS=FULL``.

A server others reach must not be open to them: a non-loopback ``host`` is refused
unless ``auth`` turns on MLflow's basic-auth app (or the caller insists with
``insecure_no_auth``). With ``auth``, the admin user is ``admin`` with its password
from ``STAGEFLOW_ADMIN_PASSWORD``, new users have no permissions until granted, and
the auth database lives beside the tracking data. Basic auth sends the password with
every call, so off loopback it needs ``tls``: Caddy (already Stageflow's front door)
then terminates HTTPS on ``host:port``, with its internal CA (the root certificate is
kept under ``STAGEFLOW_HOME`` for clients to trust) or the given certificate files, and
``mlflow server`` itself listens on a free loopback port only. Secrets stay out of files and
command lines: the store URIs reach ``mlflow server`` through its own environment
variables, ``server.json`` records them masked, and ``STAGEFLOW_HOME`` is owner-only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stageflow import processes, tracking
from stageflow.errors import StageflowError, UsageError
from stageflow.secrets import PRIVATE_FILE_MODE, mask_uri, private_dir, write_private

logger = logging.getLogger(__name__)

STATE_FILE = "server.json"
LOG_FILE = "server.log"
START_TIMEOUT_S = 90.0
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
# Read by _sqlite_tuning/sitecustomize.py in the server's processes.
SQLITE_SYNCHRONOUS_ENV = "STAGEFLOW_SQLITE_SYNCHRONOUS"
SQLITE_TUNING_DIR = Path(__file__).with_name("_sqlite_tuning")

# Basic auth (MLflow's `basic-auth` app). The password never travels in argv or files.
ADMIN_USERNAME = "admin"  # MLflow's default admin name
ADMIN_PASSWORD_ENV = "STAGEFLOW_ADMIN_PASSWORD"
MIN_PASSWORD_LENGTH = 12  # MLflow refuses shorter ones at start-up
AUTH_CONFIG_FILE = "basic_auth.ini"
# The auth app's CSRF protection signs with a key that must survive restarts.
FLASK_SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
FLASK_SECRET_FILE = "flask_secret.key"
AUTH_DB_FILE = "basic_auth.db"
# A password check is scrypt/PBKDF2, ~0.3 s; caching a good one for a minute keeps every
# tracking call from paying it (a changed password is honoured within that minute).
AUTH_CACHE_TTL_S = 60

# HTTPS through Caddy (`--tls`): its files live in this folder under STAGEFLOW_HOME.
TLS_DIR = "tls"
TLS_LOG_FILE = "caddy.log"
# Where Caddy's internal CA keeps its root, under the storage folder it is given.
INTERNAL_ROOT = Path("pki", "authorities", "local", "root.crt")


@dataclass
class ServerInfo:
    pid: int
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    log: str
    auth: bool = False
    reused: bool = False
    started: float | None = None  # the process's start time: with the pid, its identity
    stale: bool = False  # set by stop(): the recorded pid is no longer this server
    tls: bool = False
    ca_cert: str | None = None  # the internal CA's root, for MLFLOW_TRACKING_SERVER_CERT_PATH
    proxy_pid: int | None = None  # Caddy, terminating HTTPS in front of the server
    proxy_started: float | None = None
    upstream_port: int | None = None  # mlflow server's own port behind Caddy (loopback)

    @property
    def uri(self) -> str:
        if self.tls:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
            return f"https://{host}:{self.port}"
        return f"http://{self.host}:{self.port}"

    @property
    def verify(self) -> bool | str:
        """How a client on this machine checks the server's certificate."""
        if not self.tls:
            return True
        # A given certificate names the hosts clients use, perhaps not 127.0.0.1: the
        # readiness probe of our own child on loopback sends nothing secret.
        return self.ca_cert or False


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path | None = None) -> ServerInfo | None:
    path = _state_path(home or tracking.home())
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        return ServerInfo(
            **{k: v for k, v in state.items() if k in ServerInfo.__dataclass_fields__}
        )
    except (ValueError, TypeError, AttributeError):
        return None


def enable_sqlite_wal(db_path: Path) -> None:
    """Create the SQLite file in WAL mode; the mode is stored in the file and outlives us.

    In the default rollback-journal mode every commit writes and fsyncs a journal
    and the database; in WAL mode it appends to one log, and with
    ``synchronous=NORMAL`` (``server_env``) it does not wait for an fsync.
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    os.chmod(db_path, PRIVATE_FILE_MODE)


def server_command(
    host: str,
    port: int,
    workers: int = 1,
    auth: bool = False,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` command line. The store URIs are not in it: a password in
    one would show in every process list; they go through :func:`server_env`."""
    command = [
        processes.bin_path("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--serve-artifacts",
        "--workers",
        str(workers),
    ]
    if auth:
        command += ["--app-name", "basic-auth"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return command


def server_env(
    backend_store_uri: str, artifacts_destination: str, auth_config: Path | None = None
) -> dict[str, str]:
    """The environment for the ``mlflow server`` process tree (see the module docstring).

    A setting already in this process's environment wins, so a user can opt back
    into MLflow's job execution or into ``synchronous=FULL``.
    """
    extra = {
        # `mlflow server`'s own variables for --backend-store-uri / --artifacts-destination.
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
    }
    if auth_config is not None:
        extra["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        extra["MLFLOW_AUTH_ADMIN_USERNAME"] = ADMIN_USERNAME
        extra["MLFLOW_AUTH_ADMIN_PASSWORD"] = os.environ[ADMIN_PASSWORD_ENV]
        extra[FLASK_SECRET_ENV] = os.environ.get(FLASK_SECRET_ENV) or _flask_secret(
            auth_config.parent
        )
    if JOB_EXECUTION_ENV not in os.environ:
        extra[JOB_EXECUTION_ENV] = "false"
    if backend_store_uri.startswith("sqlite:"):
        # WAL + synchronous=NORMAL is SQLite's standard durability trade: never
        # corrupt, nothing lost when a process dies, the last commits possibly
        # lost on a power cut or OS crash.
        extra[SQLITE_SYNCHRONOUS_ENV] = os.environ.get(SQLITE_SYNCHRONOUS_ENV, "NORMAL")
        python_path = [str(SQLITE_TUNING_DIR), os.environ.get("PYTHONPATH", "")]
        extra["PYTHONPATH"] = os.pathsep.join(p for p in python_path if p)
    return processes.venv_env(extra)


def start(
    port: int = tracking.DEFAULT_PORT,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    host: str = tracking.DEFAULT_HOST,
    home: Path | None = None,
    tie_to_parent: bool = False,
    auth: bool = False,
    allowed_hosts: str | None = None,
    insecure_no_auth: bool = False,
    tls: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> ServerInfo:
    """Start the tracking server, or return the healthy one already running from ``home``.

    Args:
        auth: serve MLflow's basic-auth app (admin password from ``STAGEFLOW_ADMIN_PASSWORD``).
        allowed_hosts: the Host names MLflow answers (``--allowed-hosts``), e.g. the DNS
            name colleagues use; MLflow answers 403 to any other.
        insecure_no_auth: bind a non-loopback ``host`` without authentication anyway.
        tls: answer HTTPS only, through Caddy, with its internal CA unless ``tls_cert`` and
            ``tls_key`` (PEM files) are given.

    Raises:
        UsageError: the port is taken by something that is not our server; a public
            bind without ``auth``; ``auth`` without the admin password.
        StageflowError: the server exited or did not become healthy.
    """
    check_exposure(host, auth, insecure_no_auth)
    tls = check_tls(tls, tls_cert, tls_key)
    warning = transport_warning(host, auth, tls)
    if warning:
        logger.warning(warning)
    if auth and not os.environ.get(ADMIN_PASSWORD_ENV):
        raise UsageError(
            f"--auth needs the admin password in {ADMIN_PASSWORD_ENV} "
            f"(e.g. `read -s {ADMIN_PASSWORD_ENV}; export {ADMIN_PASSWORD_ENV}`); "
            "it is never taken from the command line"
        )
    if auth and len(os.environ[ADMIN_PASSWORD_ENV]) < MIN_PASSWORD_LENGTH:
        raise UsageError(
            f"{ADMIN_PASSWORD_ENV} must be at least {MIN_PASSWORD_LENGTH} characters "
            "(MLflow's rule for its users' passwords)"
        )
    home = private_dir(home or tracking.home())
    current = read_state(home)
    if current and processes.http_ok(current.uri + "/health", verify=current.verify):
        if current.port == port:
            current.reused = True
            return current
        raise UsageError(
            f"a Stageflow tracking server already runs from {home} at {current.uri}; "
            "stop it with `stageflow server stop` or use that port"
        )
    if processes.port_in_use(host, port):
        raise UsageError(
            f"port {port} on {host} is already in use by another program; pick another with --port"
        )

    if backend_store_uri is None:
        db_path = home / "mlflow.db"
        enable_sqlite_wal(db_path)
        backend_store_uri = f"sqlite:///{db_path}"
    if artifacts_destination is None:
        artifacts_destination = str(home / "artifacts")

    auth_config = write_auth_config(home) if auth else None
    log_path = home / LOG_FILE
    if log_path.exists():
        os.chmod(log_path, PRIVATE_FILE_MODE)
    else:
        write_private(log_path, "")
    # Behind Caddy, mlflow server listens on loopback only; Caddy holds host:port.
    upstream_port = processes.free_port() if tls else None
    proc = processes.spawn(
        server_command(
            tracking.DEFAULT_HOST if tls else host,
            upstream_port or port,
            auth=auth,
            allowed_hosts=allowed_hosts,
        ),
        log_path=log_path,
        env=server_env(backend_store_uri, artifacts_destination, auth_config),
        tie_to_parent=tie_to_parent,
    )
    info = ServerInfo(
        pid=proc.pid,
        host=host,
        port=port,
        backend_store_uri=mask_uri(backend_store_uri),
        artifacts_destination=mask_uri(artifacts_destination),
        log=str(log_path),
        auth=auth,
        started=processes.started_at(proc.pid),
        tls=tls,
        upstream_port=upstream_port,
    )
    upstream = f"http://{tracking.DEFAULT_HOST}:{upstream_port}" if tls else info.uri
    try:
        processes.wait_until(
            lambda: processes.http_ok(upstream + "/health"),
            timeout=START_TIMEOUT_S,
            proc=proc,
            what=f"mlflow server on {upstream}",
            log_path=log_path,
        )
        if tls:
            _start_tls_proxy(info, home, tls_cert, tls_key, allowed_hosts, tie_to_parent)
    except (RuntimeError, TimeoutError, StageflowError) as exc:
        processes.stop_group(proc.pid)
        if info.proxy_pid:
            processes.stop_group(info.proxy_pid)
        raise StageflowError(str(exc).splitlines()[0]) from None
    if auth and (home / AUTH_DB_FILE).exists():
        os.chmod(home / AUTH_DB_FILE, PRIVATE_FILE_MODE)  # MLflow creates it with the umask
    write_private(_state_path(home), json.dumps(asdict(info), indent=2))
    logger.info("tracking server ready at %s (pid %d)", info.uri, info.pid)
    return info


def check_tls(tls: bool, cert: Path | None, key: Path | None) -> bool:
    """Whether to serve HTTPS; given certificate files must come as a readable pair."""
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together: give both PEM files, or neither")
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{option} {path}: no such file")
    return tls or cert is not None


def transport_warning(host: str, auth: bool, tls: bool) -> str | None:
    """The warning for basic auth in plain HTTP beyond loopback: passwords in clear text."""
    if auth and not tls and not is_loopback(host):
        return (
            f"--auth on {host} without --tls: every call sends a password over plain HTTP, "
            "readable by anyone on the network path; add --tls"
        )
    return None


def render_tls_caddyfile(
    info: ServerInfo,
    data_dir: Path,
    log_path: Path,
    cert: Path | None = None,
    key: Path | None = None,
    allowed_hosts: str | None = None,
) -> str:
    """Caddy in front of the tracking server: HTTPS on ``host:port``, nothing else.

    With the internal CA, Caddy issues a certificate for each name a client may use
    (localhost, 127.0.0.1, the bound address, the ``allowed_hosts`` names); given files
    serve every name. No redirect listener on port 80, no admin API, no trust-store
    changes; the Host header passes through, so MLflow's ``--allowed-hosts`` still
    decides who it answers.
    """
    bind = info.host if info.host not in ("0.0.0.0", "::") else ""
    if cert is not None:
        sites = [f"https://:{info.port}"]
        tls_line = f"tls {Path(cert).resolve()} {Path(key).resolve()}"
    else:
        names = ["localhost", "127.0.0.1"]
        if bind and bind not in names:
            names.append(bind)
        for entry in (allowed_hosts or "").split(","):
            name = entry.strip().rsplit(":", 1)[0] if entry.strip() else ""
            if name and "*" not in name and name not in names:
                names.append(name)
        sites = [f"https://{name}:{info.port}" for name in names]
        tls_line = "tls internal"
    bind_line = f"\tbind {bind}\n" if bind else ""
    return f"""\
{{
\tadmin off
\tpersist_config off
\tauto_https disable_redirects
\tskip_install_trust
\tstorage file_system {data_dir}
\tlog {{
\t\toutput file {log_path} {{
\t\t\troll_size 10MiB
\t\t\troll_keep 3
\t\t}}
\t}}
}}

{", ".join(sites)} {{
{bind_line}\t{tls_line}
\treverse_proxy {tracking.DEFAULT_HOST}:{info.upstream_port}
}}
"""


def _start_tls_proxy(
    info: ServerInfo,
    home: Path,
    cert: Path | None,
    key: Path | None,
    allowed_hosts: str | None,
    tie_to_parent: bool,
) -> None:
    """Start Caddy terminating HTTPS for ``info`` and wait until it answers through TLS."""
    tls_dir = private_dir(home / TLS_DIR)
    data_dir = tls_dir / "data"
    log_path = tls_dir / TLS_LOG_FILE
    config = tls_dir / "Caddyfile"
    write_private(config, render_tls_caddyfile(info, data_dir, log_path, cert, key, allowed_hosts))
    out_path = tls_dir / "caddy.out"  # what Caddy prints before its log takes over
    write_private(out_path, "")
    proxy = processes.spawn(
        [processes.bin_path("caddy"), "run", "--config", str(config), "--adapter", "caddyfile"],
        log_path=out_path,
        # Caddy's other state (autosaved config) stays beside ours, not in the user's home.
        env=processes.venv_env(
            {"XDG_DATA_HOME": str(data_dir), "XDG_CONFIG_HOME": str(tls_dir / "config")}
        ),
        tie_to_parent=tie_to_parent,
    )
    info.proxy_pid = proxy.pid
    info.proxy_started = processes.started_at(proxy.pid)
    if cert is None:
        info.ca_cert = str(data_dir / INTERNAL_ROOT)
        processes.wait_until(
            lambda: Path(info.ca_cert).exists(),
            timeout=START_TIMEOUT_S,
            proc=proxy,
            what="Caddy's internal CA",
            log_path=out_path,
        )
    processes.wait_until(
        lambda: processes.http_ok(info.uri + "/health", verify=info.verify),
        timeout=START_TIMEOUT_S,
        proc=proxy,
        what=f"HTTPS on {info.uri}",
        log_path=out_path,
    )


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(host: str, auth: bool, insecure_no_auth: bool) -> None:
    """Refuse to open the tracking server beyond this machine without authentication.

    Anyone who reaches an open server moves ``@champion`` (what ``serve`` follows), reads
    every run and data split, and can overwrite a version's files through the artifact API.
    """
    if is_loopback(host) or auth or insecure_no_auth:
        return
    raise UsageError(
        f"--host {host} would let anyone who reaches it change what is served; add --auth "
        f"(admin password in {ADMIN_PASSWORD_ENV}) or, on a network you trust completely, "
        "--insecure-no-auth"
    )


def write_auth_config(home: Path) -> Path:
    """MLflow's basic-auth configuration for a server run from ``home`` (owner-only).

    New users get no permission until one is granted (``default_permission``); the admin
    password is not in the file but in the server's environment (MLflow reads
    ``MLFLOW_AUTH_ADMIN_PASSWORD`` only to create the admin user on first start).
    """
    path = home / AUTH_CONFIG_FILE
    write_private(
        path,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{home / AUTH_DB_FILE}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n",
    )
    return path


def _flask_secret(home: Path) -> str:
    """The key the auth app signs CSRF tokens with: made once, kept owner-only in ``home``."""
    path = home / FLASK_SECRET_FILE
    if not path.exists():
        write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


def stop(home: Path | None = None) -> ServerInfo | None:
    """Stop the server started from ``home``; returns what was stopped, or None.

    A ``server.json`` whose pid now belongs to another process (the server died and
    the pid was reused) is removed without signalling anything; the result says
    ``stale``.
    """
    home = home or tracking.home()
    info = read_state(home)
    if info is None:
        return None
    if info.proxy_pid and info.proxy_started is not None:
        if processes.is_process(info.proxy_pid, info.proxy_started):
            processes.stop_group(info.proxy_pid)
    if is_our_server(info):
        processes.stop_group(info.pid)
    else:
        info.stale = True
        logger.warning(
            "%s names pid %d, which is no longer the tracking server started from %s; "
            "removed the stale file and signalled nothing",
            _state_path(home),
            info.pid,
            home,
        )
    _state_path(home).unlink(missing_ok=True)
    return info


def is_our_server(info: ServerInfo) -> bool:
    """Whether ``info.pid`` is still the server ``info`` records (pid and start time).

    A file written before start times were recorded is judged by the command line:
    an ``mlflow server`` on the recorded port.
    """
    if info.started is not None:
        return processes.is_process(info.pid, info.started)
    argv = processes.command_line(info.pid)
    return "server" in argv and any("mlflow" in a for a in argv[:2]) and str(info.port) in argv


def run_foreground(info: ServerInfo) -> None:
    """Block until SIGINT/SIGTERM or the server's exit, then stop it."""
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (
            not stopping
            and _child_alive(info.pid)
            and (info.proxy_pid is None or _child_alive(info.proxy_pid))
        ):
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop(Path(info.log).parent)


def _child_alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0
    if done:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
