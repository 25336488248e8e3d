"""Tracking latency: a stock ``mlflow server`` against Stageflow's embedded one.

One invocation starts both servers on free ports in temporary folders, times
MLflow's fluent tracking calls against each from this process, prints a table
with the ratio, writes the figures as JSON to ``benchmarks/results/`` (ignored
by git), and stops everything it started, also on Ctrl-C or SIGTERM.

- baseline: ``mlflow server --backend-store-uri sqlite:///...`` with MLflow's
  defaults (rollback journal, ``synchronous=FULL``, 4 uvicorn workers, job
  execution on);
- stageflow: ``stageflow.server.start(port=..., home=...)``.

Two phases:

- cold: the first ``--cold-calls`` ``log_metric`` calls right after ``/health``
  answers, which is what a training script started right after the server sees.
  Each server is started and measured while the other one is idle.
- steady: once both servers are quiet (their processes use < 5 % of a CPU), the
  calls go to the two servers in alternating rounds, so that load from other
  programs on the machine falls on both alike. Besides client-side latency it
  reports the CPU time all of a server's processes spent per call, a figure
  that load from other programs barely moves.

Stageflow's server takes ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` and
``STAGEFLOW_SQLITE_SYNCHRONOUS`` from this environment (the baseline ignores
them): that is how BENCHMARKS.md measures what each of its settings buys.

Usage:
    .venv/bin/python benchmarks/tracking_latency.py [--calls 300] [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's stageflow, installed or not

import mlflow  # noqa: E402

from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
TARGET_MS = 10.0
WARMUP_CALLS = 20
QUIET_CPU_SHARE = 0.05  # of one CPU, over QUIET_WINDOW_S
QUIET_WINDOW_S = 2.0
QUIET_TIMEOUT_S = 180.0
START_TIMEOUT_S = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

BASELINE = "baseline"
STAGEFLOW = "stageflow"
COLD = "log_metric, cold"


def _log_metric(i: int) -> None:
    mlflow.log_metric("loss", 1.0 / (i + 1), step=i)


def _log_param(i: int) -> None:
    mlflow.log_param(f"param_{i}", i)  # a new key each call: a param cannot change value


def _set_tag(i: int) -> None:
    mlflow.set_tag(f"tag_{i % 50}", i)


def _log_batch(i: int) -> None:
    mlflow.log_metrics({f"metric_{k}": i + k for k in range(10)}, step=i)


OPS: dict[str, Callable[[int], None]] = {
    "log_metric": _log_metric,
    "log_param": _log_param,
    "set_tag": _set_tag,
    "log_batch (10 metrics)": _log_batch,
}


@dataclass
class Server:
    name: str
    pid: int  # leader of the server's process group
    uri: str
    db_path: Path
    ready_s: float  # seconds from spawn to /health answering
    run_id: str = ""
    settings: dict = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


# --- the machine and the servers' processes ------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes in a process group."""
    total = 0
    for pid in _group_members(pgid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _wait_until_quiet(srv: Server) -> float:
    """Wait until the server's processes are idle; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < QUIET_TIMEOUT_S:
        before = _group_cpu_s(srv.pid)
        time.sleep(QUIET_WINDOW_S)
        if (_group_cpu_s(srv.pid) - before) / QUIET_WINDOW_S < QUIET_CPU_SHARE:
            break
    else:
        print(f"  {srv.name}: still busy after {QUIET_TIMEOUT_S:.0f}s; measuring anyway")
    return time.monotonic() - start


def _describe(srv: Server) -> dict:
    """What the server actually runs with, read from its processes and its database."""
    members = _group_members(srv.pid)
    uvicorn_env: dict[str, str] = {}
    workers = None
    for pid in members:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "uvicorn" in argv and "--workers" in argv:
            workers = int(argv[argv.index("--workers") + 1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            uvicorn_env = dict(kv.split("=", 1) for kv in environ.split("\0") if "=" in kv)
    with contextlib.closing(sqlite3.connect(f"file:{srv.db_path}?mode=ro", uri=True)) as conn:
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    jobs = uvicorn_env.get(server.JOB_EXECUTION_ENV, "true (MLflow default)")
    return {
        "uvicorn_workers": workers,
        "journal_mode": journal_mode,
        "synchronous": uvicorn_env.get(server.SQLITE_SYNCHRONOUS_ENV, "FULL (SQLite default)"),
        "job_execution": jobs,
        "processes": len(members),
    }


def _machine(tmp_root: Path) -> dict:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        mem_kb = int(meminfo.split("MemTotal:", 1)[1].split()[0])
    fs = "unknown"
    with contextlib.suppress(OSError):
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        here = str(tmp_root.resolve())
        best = max(
            (m for m in mounts if here == m[1] or here.startswith(m[1].rstrip("/") + "/")),
            key=lambda m: len(m[1]),
        )
        fs = f"{best[2]} ({best[0]} on {best[1]})"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / 2**20, 1),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mlflow": mlflow.__version__,
        "sqlalchemy": importlib.metadata.version("sqlalchemy"),
        "uvicorn": importlib.metadata.version("uvicorn"),
        "temp_dir_filesystem": fs,
    }


# --- starting the servers -----------------------------------------------------------------


def _spawn_baseline(root: Path) -> tuple[Server, subprocess.Popen]:
    """Start a stock ``mlflow server``; the caller waits for it (and can stop it meanwhile)."""
    port = processes.free_port()
    db_path = root / "mlflow.db"
    # Stock means stock: none of Stageflow's settings, even if this shell has them.
    env = processes.venv_env()
    for name in (server.JOB_EXECUTION_ENV, server.SQLITE_SYNCHRONOUS_ENV):
        env.pop(name, None)
    command = [
        processes.bin_path("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{db_path}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    proc = processes.spawn(command, log_path=root / "server.log", env=env, tie_to_parent=True)
    return Server(BASELINE, proc.pid, f"http://127.0.0.1:{port}", db_path, time.monotonic()), proc


def _wait_for_baseline(srv: Server, proc: subprocess.Popen) -> None:
    processes.wait_until(
        lambda: processes.http_ok(srv.uri + "/health"),
        timeout=START_TIMEOUT_S,
        proc=proc,
        what="stock mlflow server",
        log_path=srv.db_path.with_name("server.log"),
    )
    srv.ready_s = time.monotonic() - srv.ready_s


def _start_stageflow(home: Path) -> Server:
    started = time.monotonic()
    info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
    return Server(
        STAGEFLOW, info.pid, info.uri, home / "mlflow.db", ready_s=time.monotonic() - started
    )


def _stop(srv: Server, stageflow_home: Path) -> None:
    if srv.name == STAGEFLOW:
        server.stop(stageflow_home)
    else:
        processes.stop_group(srv.pid)


# --- measuring ----------------------------------------------------------------------------


def _new_run(srv: Server, name: str) -> str:
    mlflow.set_tracking_uri(srv.uri)
    experiment = mlflow.set_experiment(f"tracking-latency-{srv.name}")
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name) as run:
        return run.info.run_id


def _measure_cold(srv: Server, calls: int) -> None:
    """The first ``calls`` log_metric calls, started right after /health answered."""
    srv.run_id = _new_run(srv, "cold")
    with mlflow.start_run(run_id=srv.run_id):
        srv.samples[COLD] = [_timed(_log_metric, i) for i in range(calls)]


def _timed(op: Callable[[int], None], i: int) -> float:
    start = time.perf_counter()
    op(i)
    return (time.perf_counter() - start) * 1000


def _measure_block(srv: Server, op_name: str, calls: int) -> None:
    op = OPS[op_name]
    first = srv.calls.get(op_name, 0)
    mlflow.set_tracking_uri(srv.uri)
    with mlflow.start_run(run_id=srv.run_id):
        cpu_before = _group_cpu_s(srv.pid)
        samples = [_timed(op, WARMUP_CALLS + first + i) for i in range(calls)]
        cpu_after = _group_cpu_s(srv.pid)
    srv.samples.setdefault(op_name, []).extend(samples)
    srv.cpu_s[op_name] = srv.cpu_s.get(op_name, 0.0) + cpu_after - cpu_before
    srv.calls[op_name] = first + calls


def _measure_steady(servers: list[Server], calls: int, rounds: int) -> None:
    for srv in servers:
        srv.run_id = _new_run(srv, "steady")
        with mlflow.start_run(run_id=srv.run_id):
            for op in OPS.values():
                for i in range(WARMUP_CALLS):
                    op(i)
    per_block = -(-calls // rounds)
    for round_number in range(rounds):
        # Alternate who goes first, so neither always follows the other's calls.
        order = servers if round_number % 2 == 0 else servers[::-1]
        for op_name in OPS:
            for srv in order:
                _measure_block(srv, op_name, per_block)


def _stats(samples: list[float]) -> dict:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "n": len(samples),
        "median_ms": round(statistics.median(samples), 2),
        "p90_ms": round(cuts[89], 2),
        "p99_ms": round(cuts[98], 2),
        "min_ms": round(min(samples), 2),
    }


# --- reporting ----------------------------------------------------------------------------


def _report(servers: list[Server], machine: dict, meta: dict) -> dict:
    base, flow = servers
    results: dict = {"servers": {}, "ratio_of_medians": {}}
    for srv in servers:
        ops = {}
        for op_name, samples in srv.samples.items():
            ops[op_name] = _stats(samples)
            if op_name in srv.calls:
                ops[op_name]["server_cpu_ms_per_call"] = round(
                    srv.cpu_s[op_name] * 1000 / srv.calls[op_name], 2
                )
            ops[op_name]["samples_ms"] = [round(s, 3) for s in samples]
        results["servers"][srv.name] = {
            "uri": srv.uri,
            "ready_s": round(srv.ready_s, 1),
            "settings": srv.settings,
            "ops": ops,
        }

    print()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB, "
        f"Python {machine['python']}, mlflow {machine['mlflow']}, "
        f"temp dirs on {machine['temp_dir_filesystem']}"
    )
    print(f"load average before/after: {meta['load_before']} / {meta['load_after']}")
    for srv in servers:
        s = srv.settings
        print(
            f"{srv.name:>9}: {s['uvicorn_workers']} uvicorn worker(s), "
            f"journal={s['journal_mode']}, synchronous={s['synchronous']}, "
            f"job execution={s['job_execution']}, {s['processes']} processes, "
            f"/health after {srv.ready_s:.1f}s"
        )
    print()
    print(f"{'':<24}{'baseline':^21}  {'stageflow':^21}  {'ratio':>6}  server CPU ms")
    stats_header = f"{'median':>7}{'p90':>7}{'p99':>7}"
    print(f"{'ms per call':<24}{stats_header}  {stats_header}  {'median':>6}  base stageflow")
    for op_name in [COLD, *OPS]:
        b = results["servers"][BASELINE]["ops"][op_name]
        f = results["servers"][STAGEFLOW]["ops"][op_name]
        ratio = b["median_ms"] / f["median_ms"]
        results["ratio_of_medians"][op_name] = round(ratio, 2)
        cpu = (
            f"{b['server_cpu_ms_per_call']:4.1f} {f['server_cpu_ms_per_call']:9.1f}"
            if "server_cpu_ms_per_call" in b
            else ""
        )
        print(
            f"{op_name:<24}"
            f"{b['median_ms']:7.1f}{b['p90_ms']:7.1f}{b['p99_ms']:7.1f}  "
            f"{f['median_ms']:7.1f}{f['p90_ms']:7.1f}{f['p99_ms']:7.1f}  "
            f"{ratio:5.1f}x  {cpu}"
        )
    print(f"({COLD}: the first {meta['cold_calls']} calls right after /health answered)")
    median = results["servers"][STAGEFLOW]["ops"]["log_metric"]["median_ms"]
    verdict = "met" if median <= TARGET_MS else "MISSED"
    print(f"target: stageflow log_metric median <= {TARGET_MS:.0f} ms: {verdict} ({median} ms)")
    results["target"] = {"log_metric_median_ms": TARGET_MS, "met": median <= TARGET_MS}
    return results


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="steady calls per operation")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    parser.add_argument("--cold-calls", type=int, default=100, help="calls in the cold phase")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the servers keep data")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: dated)")
    parser.add_argument("--no-json", action="store_true", help="write no results file")
    args = parser.parse_args(argv)
    if args.calls < args.rounds or args.cold_calls < 2:
        parser.error("--calls must be at least --rounds, and --cold-calls at least 2")

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tracking-latency-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        stageflow_home = root / STAGEFLOW
        machine = _machine(root)
        try:
            print("starting the stock mlflow server, then timing its first calls ...")
            baseline, proc = _spawn_baseline(root / BASELINE)
            servers.append(baseline)
            _wait_for_baseline(baseline, proc)
            _measure_cold(servers[0], args.cold_calls)
            print(f"  waited {_wait_until_quiet(servers[0]):.0f}s more for it to go quiet")
            print("starting Stageflow's server, then timing its first calls ...")
            servers.append(_start_stageflow(stageflow_home))
            _measure_cold(servers[1], args.cold_calls)
            print(f"  waited {_wait_until_quiet(servers[1]):.0f}s more for it to go quiet")
            for srv in servers:
                srv.settings = _describe(srv)
            print(f"steady phase: {args.calls} calls per operation, {args.rounds} rounds ...")
            _measure_steady(servers, args.calls, args.rounds)
        except KeyboardInterrupt:
            print("interrupted; stopping the servers")
            return 130
        finally:
            for srv in servers:
                _stop(srv, stageflow_home)

    meta = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "calls": args.calls,
        "rounds": args.rounds,
        "cold_calls": args.cold_calls,
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    results = _report(servers, machine, meta)
    if not args.no_json:
        path = args.json or RESULTS_DIR / f"tracking_latency-{started_at:%Y%m%dT%H%M%SZ}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, "machine": machine, **results}, indent=1))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
