"""Serving: stock ``mlflow models serve``, the no-op floor and Stageflow's endpoint, side by side.

One invocation starts Stageflow's tracking server on a free port in a temporary
folder, trains one model version, and serves it three ways at once:

- ``stock``: ``mlflow models serve`` of the same fitted pipeline logged as MLflow's
  plain scikit-learn flavor (skops, with the signature training infers), as MLflow's
  documentation has users do;
- ``noop``: ``mlflow models serve`` of a pyfunc that answers 0 and does nothing
  (``benchmarks/_noop_model.py``): the floor the server itself sets;
- ``stageflow``: ``stageflow serve``'s front door (Caddy) in front of the guarded
  model (data contract checks on) with its default replicas, inference log on
  (``--inference-log all``, the default);
- ``stageflow-nolog``: the same with ``--inference-log off``: the log's cost is the
  ratio of these two, measured in the same run.

Each is loaded with ``wrk`` (keep-alive connections, as real clients hold them) at
each connection count and request size, one after the other while the others idle;
the table gives requests/s, p50 and p99, and the ratios the goals are stated in.
Then, under load from keep-alive Python clients, it promotes a second version (warm:
it was in Staging) and rolls back, counting failed requests and timing the switch.
Figures go to ``benchmarks/results/serving-*.json`` (ignored by git).

Usage:
    .venv/bin/python benchmarks/serving_throughput.py [--seconds 10]
        [--connections 1,8,16] [--rows 1,100] [--family lr] [--replicas N]
        [--targets stageflow,stageflow-nolog]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout, installed or not

import mlflow  # noqa: E402
import requests  # noqa: E402
import skops.io  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

from experiments import artifacts, data  # noqa: E402
from experiments.train import train  # noqa: E402
from registry._stages import PRODUCTION, STAGING, move  # noqa: E402
from serving import guarded_model  # noqa: E402
from serving.controller import VERSION_HEADER, BackgroundServe  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
DATA, TARGET = "builtin:breast_cancer", "target"
THROUGHPUT_GOAL, LATENCY_GOAL, SWITCH_GOAL_S = 5.0, 1.5, 2.0
TARGETS = ("stock", "noop", "stageflow", "stageflow-nolog")
LOG_COST_GOAL = 0.9  # throughput with the inference log on ÷ off, at 8 connections
START_TIMEOUT_S = 180.0
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--connections", default="1,8,16", help="comma-separated (default 1,8,16)")
    parser.add_argument("--rows", default="1,100", help="rows per request (default 1,100)")
    parser.add_argument("--family", default="lr", help="model family (default lr)")
    parser.add_argument("--replicas", type=int, default=None, help="stageflow serve replicas")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"which to load (default {','.join(TARGETS)})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat each measurement, alternating the targets' order (default 1); ratios "
        "are the median of the rounds' ratios, so a busy moment hits both sides",
    )
    parser.add_argument("--skip-switch", action="store_true", help="no switch measurement")
    parser.add_argument(
        "--skip-throughput", action="store_true", help="only the switch measurement"
    )
    parser.add_argument(
        "--switch-rate",
        type=float,
        default=200.0,
        help="steady load during the switches, requests/s over all clients (default 200)",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `make bench-deps` (Debian: apt-get install wrk)")
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    targets = [t for t in TARGETS if t in args.targets.split(",")]

    machine_before = machine()  # the load average before this run adds its own
    started: list[subprocess.Popen] = []
    serve: BackgroundServe | None = None
    unlogged: BackgroundServe | None = None
    with tempfile.TemporaryDirectory(prefix="stageflow-bench-") as tmp:
        home = Path(tmp)
        info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
        try:
            os.environ["MLFLOW_TRACKING_URI"] = info.uri
            mlflow.set_tracking_uri(info.uri)
            name = "bench-serving"
            print(f"training three {args.family} versions of {name} on {DATA}")
            v1, v2, v3 = (
                train(DATA, TARGET, name, family=args.family, seed=s, tracking_uri=info.uri).version
                for s in (42, 7, 9)
            )
            stock_uri, noop_uri = log_baselines(name, v1, home)
            urls = {}
            for target, uri in (("stock", stock_uri), ("noop", noop_uri)):
                port = processes.free_port()
                started.append(start_mlflow_serve(uri, port, info.uri, home / f"{target}.log"))
                urls[target] = f"http://127.0.0.1:{port}"
            client = mlflow.MlflowClient()
            move(client, name, v1, PRODUCTION)
            kwargs = {"replicas": args.replicas} if args.replicas else {}
            serve = BackgroundServe(
                name,
                processes.free_port(),
                tracking_uri=info.uri,
                home=home,
                poll_interval=0.5,
                **kwargs,
            ).start()
            serve.wait_serving(timeout=START_TIMEOUT_S)
            urls["stageflow"] = serve.url
            if "stageflow-nolog" in targets:
                unlogged = BackgroundServe(
                    name,
                    processes.free_port(),
                    tracking_uri=info.uri,
                    home=home / "nolog",
                    poll_interval=0.5,
                    model_config={"inference_log": {"mode": "off"}},
                    **kwargs,
                ).start()
                unlogged.wait_serving(timeout=START_TIMEOUT_S)
                urls["stageflow-nolog"] = unlogged.url
            for target in ("stock", "noop"):
                wait_ready(urls[target])

            features = data.load(DATA).drop(columns=[TARGET])
            bodies = {}
            for n in rows:
                path = home / f"body-{n}.json"
                frame = features.sample(n, replace=n > len(features), random_state=0)
                path.write_text(
                    json.dumps({"dataframe_split": frame.to_dict("split", index=False)})
                )
                bodies[n] = path
            results = (
                []
                if args.skip_throughput
                else measure(urls, bodies, connections, args.seconds, home, targets, args.rounds)
            )
            # The switch is one serve's: the second (log off) would start every version
            # too, and its cold replicas would compete with the measured serve's for the CPU.
            if unlogged is not None:
                unlogged.stop()
                unlogged = None
            for proc in started:
                processes.stop_group(proc.pid)
            started.clear()
            switch = (
                {}
                if args.skip_switch
                else measure_switch(serve, client, name, [v1, v2, v3], bodies, args.switch_rate)
            )
        finally:
            if unlogged is not None:
                unlogged.stop()
            if serve is not None:
                serve.stop()
            for proc in started:
                processes.stop_group(proc.pid)
            server.stop(home)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_before,
        "family": args.family,
        "replicas": args.replicas,
        "seconds_per_run": args.seconds,
        "runs": results,
        "switch": switch,
    }
    print_table(results, connections, rows)
    print_ratios(results, connections, switch)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"serving-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"results: {path}")
    return 0


def log_baselines(name: str, version: str, home: Path) -> tuple[str, str]:
    """The same fitted pipeline as MLflow's plain sklearn flavor, and the no-op pyfunc."""
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(home / "m"))
    )
    contract = json.loads((model_dir / "artifacts" / "contract.json").read_text())
    pipeline = skops.io.load(
        model_dir / "artifacts" / "pipeline.skops", trusted=contract["skops_trusted_types"]
    )
    frame = data.load(DATA).drop(columns=[TARGET])
    X = data.prepare_features(frame)
    mlflow.set_experiment("stageflow-bench-serving")
    with mlflow.start_run(run_name="baselines") as run:
        mlflow.sklearn.log_model(
            pipeline,
            name="stock",
            serialization_format="skops",
            skops_trusted_types=contract["skops_trusted_types"],
            signature=infer_signature(X, pipeline.predict(X.head(5))),
            input_example=X.head(5),
            pip_requirements=artifacts.pinned_requirements(),
        )
        mlflow.pyfunc.log_model(
            name="noop",
            python_model=REPO / "benchmarks" / "_noop_model.py",
            pip_requirements=artifacts.pinned_requirements(),
        )
    assert guarded_model.CONTRACT == "contract"  # the artifact names read above
    return f"runs:/{run.info.run_id}/stock", f"runs:/{run.info.run_id}/noop"


def start_mlflow_serve(uri: str, port: int, tracking_uri: str, log: Path) -> subprocess.Popen:
    """``mlflow models serve`` as its documentation shows, on 127.0.0.1."""
    command = [processes.bin_path("mlflow"), "models", "serve", "-m", uri, "--env-manager"]
    command += ["local", "-h", "127.0.0.1", "-p", str(port)]
    env = processes.venv_env({"MLFLOW_TRACKING_URI": tracking_uri})
    return processes.spawn(command, log_path=log, env=env)


def wait_ready(url: str) -> None:
    processes.wait_until(
        lambda: processes.http_ok(url + "/ping", timeout=1.0),
        timeout=START_TIMEOUT_S,
        what=url,
    )


def measure(
    urls: dict,
    bodies: dict,
    connections: list[int],
    seconds: int,
    home: Path,
    targets: list,
    rounds: int = 1,
) -> list:
    results = []
    for n, body in bodies.items():
        script = home / f"post-{n}.lua"
        script.write_text(LUA.replace("{body}", str(body)))
        for conns, round_ in ((c, r) for c in connections for r in range(rounds)):
            for target in targets if round_ % 2 == 0 else targets[::-1]:
                url = urls[target] + "/invocations"
                check = requests.post(
                    url, data=body.read_bytes(), headers={"Content-Type": "application/json"}
                )
                if check.status_code != 200:
                    raise SystemExit(f"{target} answered {check.status_code}: {check.text[:300]}")
                wrk(url, script, conns, 1)  # warm-up
                figures = wrk(url, script, conns, seconds)
                figures.update(target=target, rows=n, connections=conns, round=round_)
                results.append(figures)
                print(
                    f"{target:10} rows={n:<4} conns={conns:<3} {figures['rps']:9.1f} req/s  "
                    f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  "
                    f"errors {figures['errors']}",
                    flush=True,
                )
    return results


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
        + ["--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(x) for x in sockets.groups()) if sockets else 0),
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure_switch(
    serve, client, name: str, versions: list[str], bodies: dict, rate: float
) -> dict:
    """Under keep-alive load: promote ``v2`` (warm in Staging), roll back to ``v1`` (the warm
    standby), then promote ``v3`` straight to Production (cold: never warmed)."""
    v1, v2, v3 = versions
    body = bodies[min(bodies)].read_bytes()
    move(client, name, v2, STAGING)
    # The controller warms Staging ahead of promotion: wait until it has.
    processes.wait_until(
        lambda: serve.controller.staging_version == v2, timeout=START_TIMEOUT_S, what="Staging"
    )
    answers: list[tuple[float, int | str, str | None]] = []
    stop = threading.Event()

    clients = 8
    interval = clients / rate  # each client's pace: a steady load, not a flood

    def post() -> None:
        next_at = time.monotonic()
        with requests.Session() as session:
            while not stop.is_set():
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                try:
                    r = session.post(
                        serve.url + "/invocations",
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=30,
                    )
                    answers.append((time.monotonic(), r.status_code, r.headers.get(VERSION_HEADER)))
                except requests.RequestException as exc:
                    answers.append((time.monotonic(), type(exc).__name__, None))

    threads = [threading.Thread(target=post, daemon=True) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)
        switches = {}
        for label, version in (("promotion", v2), ("rollback", v1), ("cold_promotion", v3)):
            changed = time.monotonic()
            move(client, name, version, PRODUCTION)
            deadline = changed + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if any(t > changed and v == version for t, _, v in answers[-50:]):
                    break
                time.sleep(0.02)
            first_new = min(
                (t for t, _, v in answers if t > changed and v == version), default=None
            )
            time.sleep(3.0)
            last_old = max(
                (t for t, _, v in answers if v is not None and v != version), default=changed
            )
            switches[label] = {
                "to_version": version,
                "first_new_answer_s": round(first_new - changed, 3) if first_new else None,
                "last_old_answer_s": round(max(0.0, last_old - changed), 3),
            }
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    failed = [a for a in answers if a[1] != 200]
    return {
        "clients": len(threads),
        "target_rate": rate,
        "achieved_rate": round(len(answers) / (time.monotonic() - began), 1),
        "requests": len(answers),
        "failed": len(failed),
        "failures": [str(a[1]) for a in failed[:20]],
        **switches,
    }


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} vCPUs ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, mlflow {mlflow.__version__}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def print_table(results: list, connections: list[int], rows: list[int]) -> None:
    header = ("target", "rows", "conns", "req/s", "p50 ms", "p99 ms", "errors")
    print("\n{:10} {:>4} {:>5} {:>9} {:>8} {:>8} {:>6}".format(*header))
    for r in results:
        print(
            f"{r['target']:10} {r['rows']:>4} {r['connections']:>5} {r['rps']:>9.1f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}"
        )


def log_ratios(results: list, rows: int, conns: int) -> list[float]:
    """Per round, stageflow's throughput with the inference log on ÷ off."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r["rows"] == rows and r["connections"] == conns:
            by_round.setdefault(r.get("round", 0), {})[r["target"]] = r["rps"]
    return [
        pair["stageflow"] / pair["stageflow-nolog"]
        for _, pair in sorted(by_round.items())
        if "stageflow" in pair and pair.get("stageflow-nolog")
    ]


def print_ratios(results: list, connections: list[int], switch: dict) -> None:
    def get(target, rows, conns):
        return next(
            (
                r
                for r in results
                if (r["target"], r["rows"], r["connections"]) == (target, rows, conns)
            ),
            None,
        )

    print()
    for conns in connections:
        stock, noop, ours, unlogged = (get(t, 1, conns) for t in TARGETS)
        if ours and stock and noop:
            print(
                f"single row, {conns} conns: stageflow/stock throughput "
                f"{ours['rps'] / stock['rps']:.2f}×, stageflow/noop p50 "
                f"{ours['p50_ms'] / noop['p50_ms']:.2f}×"
            )
    for conns in connections:
        for n in sorted({r["rows"] for r in results}):
            ratios = log_ratios(results, n, conns)
            if ratios:
                print(
                    f"{n} row(s), {conns} conns: inference log on/off throughput "
                    f"{statistics.median(ratios):.2f}× (median of {len(ratios)} round(s): "
                    f"{', '.join(f'{r:.2f}' for r in ratios)}; goal ≥{LOG_COST_GOAL}× at 8 conns)"
                )
    print(f"goals: ≥{THROUGHPUT_GOAL}× stock at 8 conns; p50 ≤{LATENCY_GOAL}× noop at 1 conn")
    if switch:
        print(
            f"switch under load ({switch['clients']} keep-alive clients, "
            f"{switch['achieved_rate']} req/s, {switch['requests']} "
            f"requests): {switch['failed']} failed; first answer from the new version after: "
            f"warm promotion {switch['promotion']['first_new_answer_s']} s, rollback "
            f"{switch['rollback']['first_new_answer_s']} s (goal ≤{SWITCH_GOAL_S} s), cold "
            f"promotion {switch['cold_promotion']['first_new_answer_s']} s (goal ≤15 s); "
            "goal 0 failed"
        )


if __name__ == "__main__":
    raise SystemExit(main())
