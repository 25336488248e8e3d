"""Child processes that never outlive their owner: process groups, free ports, readiness."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import requests
import urllib3

logger = logging.getLogger(__name__)


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: this interpreter's ``bin`` first on PATH.

    ``mlflow server`` and ``mlflow models serve`` start ``uvicorn`` from PATH, so
    a child started from a virtualenv that is not activated would otherwise find
    another uvicorn, or none.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update(extra or {})
    return env


def bin_path(name: str) -> str:
    """Path of an executable installed beside this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies, so a killed owner leaks nothing."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415 - in the forked child only

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(
    args: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    tie_to_parent: bool = True,
) -> subprocess.Popen:
    """Start ``args`` in a process group of its own, output appended to ``log_path``.

    With ``tie_to_parent`` the child gets SIGTERM if this process dies, even by
    SIGKILL; a detached server passes False. Linux ties this to the *thread* that
    started the child: a child spawned from a worker thread gets SIGTERM when that
    thread ends, so stop such children before the thread returns.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # handed to the child, closed below
    try:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else venv_env(),
            start_new_session=True,
            preexec_fn=_die_with_parent if tie_to_parent else None,
        )
    finally:
        log.close()


def stop_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``timeout``.

    ``pid`` leads its own group (:func:`spawn` starts each child in a new session),
    so the group's id is ``pid`` even once the leader has exited and been reaped:
    the members it leaves (``mlflow models serve``'s uvicorn, which writes its
    inference log on the way out) still get their ``timeout`` to finish. Linux
    does not reuse a pid while a group of that id has members.
    """
    pgid = pid
    if not group_alive(pgid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    else:
        logger.warning("process group %d ignored SIGTERM for %.0fs; killing it", pgid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts for killpg; look for a live member.
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == pgid:
                return True
    return False


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is none.

    With the pid, this names one process for good: a pid is reused once its process
    is gone, a (pid, start time) pair is not.
    """
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def is_process(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (see :func:`started_at`)."""
    now = started_at(pid)
    # create_time comes from the kernel's boot-relative start ticks: equal for the same
    # process, to float rounding (psutil computes it the same way each time).
    return now is not None and abs(now - started) < 0.01


def command_line(pid: int) -> list[str]:
    """The arguments process ``pid`` runs with (empty if it is gone or not ours to read)."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen | None = None,
    what: str = "process",
    log_path: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``ready`` until it is true; fail fast if ``proc`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.returncode} before it was ready"
                + (f"; its log: {log_path}\n{tail(log_path)}" if log_path else "")
            )
        time.sleep(interval)
    raise TimeoutError(
        f"{what} was not ready after {timeout:.0f}s"
        + (f"; its log: {log_path}" if log_path else "")
    )


def http_ok(url: str, timeout: float = 1.0, verify: bool | str = True) -> bool:
    """Whether ``url`` answers 200; ``verify`` is requests' (a CA bundle's path, or a bool).

    ``verify=False`` is for probing our own child on loopback, which gets no secret: its
    warning would only be noise.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            return requests.get(url, timeout=timeout, verify=verify).status_code == 200
    except requests.RequestException:
        return False


def tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
