"""Serving with ``--shadow`` on against off, in one run: what mirroring to Staging costs.

One invocation starts Stageflow's tracking server on a free port in a temporary folder,
trains two versions (v1 in Production, v2 in Staging) and runs two ``stageflow serve``
controllers side by side with the same replicas, the inference log on and the Staging
version warm in both: ``shadow-off`` and ``shadow-on`` (``--shadow``: every answered
request mirrored to v2, whose predictions are logged too). Each is loaded with ``wrk``
(keep-alive connections) at each connection count and request size, alternating which
goes first per round, while the other idles. After each ``shadow-on`` run the mirror's
counts are read from every Production replica (``GET /stageflow/shadow``): requests
mirrored, dropped (the bounded queue was full) and failed, so what the shadow did not
see is said beside what it cost. Figures go to ``benchmarks/results/shadow-*.json``.

Usage:
    .venv/bin/python benchmarks/shadow_throughput.py [--seconds 10] [--connections 8]
        [--rows 1,100] [--rounds 2] [--replicas N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout, installed or not

import mlflow  # noqa: E402
import requests  # noqa: E402

from benchmarks.serving_throughput import LUA, START_TIMEOUT_S, machine, wrk  # noqa: E402
from experiments import data  # noqa: E402
from experiments.train import train  # noqa: E402
from registry._stages import PRODUCTION, STAGING, move  # noqa: E402
from serving._mirror import STATS_PATH  # noqa: E402
from serving.controller import BackgroundServe  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
DATA, TARGET = "builtin:breast_cancer", "target"
TARGETS = ("shadow-off", "shadow-on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--connections", default="8", help="comma-separated (default 8)")
    parser.add_argument("--rows", default="1,100", help="rows per request (default 1,100)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--family", default="lr", help="model family (default lr)")
    parser.add_argument("--replicas", type=int, default=None, help="replicas per version")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `make bench-deps` (Debian: apt-get install wrk)")
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    machine_before = machine()
    serves: dict[str, BackgroundServe] = {}
    with tempfile.TemporaryDirectory(prefix="stageflow-bench-shadow-") as tmp:
        home = Path(tmp)
        info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
        try:
            os.environ["MLFLOW_TRACKING_URI"] = info.uri
            mlflow.set_tracking_uri(info.uri)
            name = "bench-shadow"
            print(f"training two {args.family} versions of {name} on {DATA}")
            v1, v2 = (
                train(DATA, TARGET, name, family=args.family, seed=s, tracking_uri=info.uri).version
                for s in (42, 7)
            )
            client = mlflow.MlflowClient()
            move(client, name, v1, PRODUCTION)
            move(client, name, v2, STAGING)
            kwargs = {"replicas": args.replicas} if args.replicas else {}
            for target in TARGETS:
                serves[target] = BackgroundServe(
                    name,
                    processes.free_port(),
                    tracking_uri=info.uri,
                    home=home / target,
                    poll_interval=0.5,
                    shadow=target == "shadow-on",
                    **kwargs,
                ).start()
            for running in serves.values():
                running.wait_serving(timeout=START_TIMEOUT_S)
            wait_shadowing(serves["shadow-on"], v2)
            bodies = write_bodies(home, rows)
            results = measure(serves, bodies, connections, args.seconds, home, args.rounds)
        finally:
            for running in serves.values():
                running.stop()
            server.stop(home)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_before,
        "family": args.family,
        "replicas": args.replicas,
        "seconds_per_run": args.seconds,
        "runs": results,
    }
    print_summary(results, connections, rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"shadow-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"results: {path}")
    return 0


def production_replicas(running: BackgroundServe) -> list[str]:
    controller = running.controller
    slot = next(s for s in controller.slots if s.version == controller.serving_version)
    return [replica.url for replica in slot.replicas]


def mirror_counts(running: BackgroundServe) -> dict:
    """The mirror's counts summed over the Production replicas."""
    total: dict = {"mirrored": 0, "dropped": 0, "failed": 0, "shadow_version": None}
    for url in production_replicas(running):
        stats = requests.get(url + STATS_PATH, timeout=10).json()["shadow"] or {}
        for key in ("mirrored", "dropped", "failed"):
            total[key] += stats.get(key, 0)
        total["shadow_version"] = total["shadow_version"] or stats.get("shadow_version")
    return total


def wait_shadowing(running: BackgroundServe, version: str) -> None:
    processes.wait_until(
        lambda: all(
            (requests.get(url + STATS_PATH, timeout=10).json()["shadow"] or {}).get(
                "shadow_version"
            )
            == version
            for url in production_replicas(running)
        ),
        timeout=START_TIMEOUT_S,
        what=f"Production's replicas mirroring to version {version}",
    )


def write_bodies(home: Path, rows: list[int]) -> dict[int, Path]:
    features = data.load(DATA).drop(columns=[TARGET])
    bodies = {}
    for n in rows:
        path = home / f"body-{n}.json"
        frame = features.sample(n, replace=n > len(features), random_state=0)
        path.write_text(json.dumps({"dataframe_split": frame.to_dict("split", index=False)}))
        bodies[n] = path
    return bodies


def measure(serves, bodies, connections, seconds, home, rounds) -> list:
    results = []
    for n, body in bodies.items():
        script = home / f"post-{n}.lua"
        script.write_text(LUA.replace("{body}", str(body)))
        for conns, round_ in ((c, r) for c in connections for r in range(rounds)):
            for target in TARGETS if round_ % 2 == 0 else TARGETS[::-1]:
                running = serves[target]
                url = running.url + "/invocations"
                wrk(url, script, conns, 1)  # warm-up
                before = mirror_counts(running)
                figures = wrk(url, script, conns, seconds)
                after = mirror_counts(running)
                figures.update(target=target, rows=n, connections=conns, round=round_)
                figures["mirror"] = {
                    k: after[k] - before[k] for k in ("mirrored", "dropped", "failed")
                }
                results.append(figures)
                print(
                    f"{target:10} rows={n:<4} conns={conns:<3} {figures['rps']:9.1f} req/s  "
                    f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  "
                    f"errors {figures['errors']}  mirror {figures['mirror']}",
                    flush=True,
                )
    return results


def print_summary(results: list, connections: list[int], rows: list[int]) -> None:
    print()
    for n in rows:
        for conns in connections:
            ratios, p99s, mirrored = [], [], []
            for round_ in sorted({r["round"] for r in results}):
                pair = {
                    r["target"]: r
                    for r in results
                    if (r["rows"], r["connections"], r["round"]) == (n, conns, round_)
                }
                if len(pair) == 2:
                    on, off = pair["shadow-on"], pair["shadow-off"]
                    ratios.append(on["rps"] / off["rps"])
                    p99s.append(on["p99_ms"] / off["p99_ms"])
                    sent = on["mirror"]["mirrored"] + on["mirror"]["dropped"]
                    sent += on["mirror"]["failed"]
                    mirrored.append(on["mirror"]["mirrored"] / max(1, sent))
            if ratios:
                print(
                    f"{n} row(s), {conns} conns: --shadow on/off throughput "
                    f"{statistics.median(ratios):.2f}× (rounds: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)}), p99 "
                    f"{statistics.median(p99s):.2f}×, share of answered requests the shadow "
                    f"answered {statistics.median(mirrored):.0%}"
                )


if __name__ == "__main__":
    raise SystemExit(main())
