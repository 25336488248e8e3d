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
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stageflow import processes, tracking
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

STATE_FILE = "server.json"
LOG_FILE = "server.log"
START_TIMEOUT_S = 90.0
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
# Read by _sqlite_tuning/sitecustomize.py in the server's processes.
SQLITE_SYNCHRONOUS_ENV = "STAGEFLOW_SQLITE_SYNCHRONOUS"
SQLITE_TUNING_DIR = Path(__file__).with_name("_sqlite_tuning")


@dataclass
class ServerInfo:
    pid: int
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    log: str
    reused: bool = False
    started: float | None = None  # the process's start time: with the pid, its identity
    stale: bool = False  # set by stop(): the recorded pid is no longer this server

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path | None = None) -> ServerInfo | None:
    path = _state_path(home or tracking.home())
    if not path.exists():
        return None
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError):
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


def server_command(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int = 1
) -> list[str]:
    return [
        processes.bin_path("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--workers",
        str(workers),
    ]


def server_env(backend_store_uri: str) -> dict[str, str]:
    """The environment for the ``mlflow server`` process tree (see the module docstring).

    A setting already in this process's environment wins, so a user can opt back
    into MLflow's job execution or into ``synchronous=FULL``.
    """
    extra = {}
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
) -> ServerInfo:
    """Start the tracking server, or return the healthy one already running from ``home``.

    Raises:
        UsageError: the port is taken by something that is not our server.
        StageflowError: the server exited or did not become healthy.
    """
    home = home or tracking.home()
    home.mkdir(parents=True, exist_ok=True)
    current = read_state(home)
    if current and processes.http_ok(current.uri + "/health"):
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

    log_path = home / LOG_FILE
    proc = processes.spawn(
        server_command(host, port, backend_store_uri, artifacts_destination),
        log_path=log_path,
        env=server_env(backend_store_uri),
        tie_to_parent=tie_to_parent,
    )
    info = ServerInfo(
        pid=proc.pid,
        host=host,
        port=port,
        backend_store_uri=backend_store_uri,
        artifacts_destination=artifacts_destination,
        log=str(log_path),
        started=processes.started_at(proc.pid),
    )
    try:
        processes.wait_until(
            lambda: processes.http_ok(info.uri + "/health"),
            timeout=START_TIMEOUT_S,
            proc=proc,
            what=f"mlflow server on {info.uri}",
            log_path=log_path,
        )
    except (RuntimeError, TimeoutError) as exc:
        processes.stop_group(proc.pid)
        raise StageflowError(str(exc).splitlines()[0]) from None
    _state_path(home).write_text(json.dumps(asdict(info), indent=2))
    logger.info("tracking server ready at %s (pid %d)", info.uri, info.pid)
    return info


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
        while not stopping and _child_alive(info.pid):
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
