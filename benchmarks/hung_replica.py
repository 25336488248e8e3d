"""Serving through a hung replica and a killed front door: what clients see, how soon it heals.

One invocation starts Stageflow's tracking server in a temporary folder, trains one
``lr`` version on ``builtin:breast_cancer``, serves it with ``stageflow serve``'s
controller (2 replicas), and puts steady keep-alive load on the front door from
Python clients (each posting single rows, ``--clients`` of them, paced to about
``--rate`` requests/s in all). Then:

1. **hang**: after ``--warmup`` seconds it stops one serving replica (SIGSTOP) and
   keeps the load on until the controller has replaced it with a fresh replica that
   has proved itself, then ``--after`` seconds more. Reported: failed requests, p50 /
   p99 / max latency before, during (SIGSTOP → fresh replica proved) and after the
   hang, and the seconds from SIGSTOP to the fresh replica's proof.
2. **front door**: it kills Caddy (SIGKILL) under the same load and reports the
   seconds until the front door answers again and the requests that failed meanwhile.

Figures go to ``benchmarks/results/hung-replica-*.json`` (ignored by git).

Usage:
    .venv/bin/python benchmarks/hung_replica.py [--clients 8] [--rate 150]
        [--warmup 10] [--after 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout, installed or not

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

from experiments import data  # noqa: E402
from experiments.train import train  # noqa: E402
from registry._stages import PRODUCTION, move  # noqa: E402
from serving.controller import BackgroundServe  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
DATA, TARGET = "builtin:breast_cancer", "target"
START_TIMEOUT_S = 180.0
REPLACE_TIMEOUT_S = 120.0


class Load:
    """Keep-alive clients, paced; every request's (start, seconds, outcome) recorded."""

    def __init__(self, url: str, body: dict, clients: int, rate: float):
        self.url, self.body = url + "/invocations", body
        self.pause = clients / rate
        self.records: list[tuple[float, float, int | str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post, daemon=True) for _ in range(clients)]

    def _post(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    answer = session.post(self.url, json=self.body, timeout=60)
                    outcome: int | str = answer.status_code
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                took = time.monotonic() - began
                self.records.append((began, took, outcome))
                self._stop.wait(max(0.0, self.pause - took))

    def window(self, start: float, end: float) -> dict:
        inside = [(took, outcome) for began, took, outcome in self.records if start <= began < end]
        latencies = np.array([took for took, _ in inside]) * 1000 if inside else np.array([0.0])
        return {
            "requests": len(inside),
            "failed": sum(1 for _, outcome in inside if outcome != 200),
            "failures": sorted({str(outcome) for _, outcome in inside if outcome != 200}),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "max_ms": round(float(latencies.max()), 1),
        }

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def measure_hang(serve: BackgroundServe, load: Load, warmup: float, after: float) -> dict:
    controller = serve.controller
    # A version's replicas after the first start once it proved itself: hang one of a
    # version whose replicas all serve.
    processes.wait_until(
        lambda: all(r.ready for r in controller._active.replicas),
        timeout=180,
        what="every replica proved",
    )
    time.sleep(warmup)
    hung = controller._active.replicas[0]
    stopped = hung.pid
    began = time.monotonic()
    os.killpg(stopped, signal.SIGSTOP)
    try:
        processes.wait_until(
            lambda: hung.ready and hung.alive() and hung.pid != stopped,
            timeout=REPLACE_TIMEOUT_S,
            what="the fresh replica",
        )
    finally:
        if processes.group_alive(stopped):
            os.killpg(stopped, signal.SIGCONT)
    replaced = time.monotonic()
    time.sleep(after)
    return {
        "replaced_s": round(replaced - began, 2),
        "before": load.window(began - warmup + 2, began),
        "during": load.window(began, replaced),
        "after": load.window(replaced, replaced + after),
    }


def measure_caddy(serve: BackgroundServe, load: Load, url: str, body: dict) -> dict:
    door = serve.controller.front_door
    first = door.proc.pid
    began = time.monotonic()
    os.kill(first, signal.SIGKILL)
    while True:
        try:
            if requests.post(url + "/invocations", json=body, timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() - began > REPLACE_TIMEOUT_S:
            raise TimeoutError("the front door did not answer again")
        time.sleep(0.02)
    back = time.monotonic()
    time.sleep(3)
    return {"answering_again_s": round(back - began, 2), "window": load.window(began, back + 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s in all (paced)")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=10.0)
    args = parser.parse_args(argv)

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stageflow-bench-") as tmp:
        home = Path(tmp)
        info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
        serve = None
        try:
            mlflow.set_tracking_uri(info.uri)
            name = "bench-hung"
            version = train(DATA, TARGET, name, family="lr", tracking_uri=info.uri).version
            move(mlflow.MlflowClient(info.uri), name, version, PRODUCTION)
            serve = BackgroundServe(
                name,
                processes.free_port(),
                tracking_uri=info.uri,
                home=home,
                poll_interval=0.5,
                replicas=2,
            ).start()
            serve.wait_serving(timeout=START_TIMEOUT_S)
            rows = data.load(DATA).drop(columns=[TARGET]).head(1)
            body = {"dataframe_split": rows.to_dict(orient="split", index=False)}
            with Load(serve.url, body, args.clients, args.rate) as load:
                hang = measure_hang(serve, load, args.warmup, args.after)
                caddy = measure_caddy(serve, load, serve.url, body)
        finally:
            if serve is not None:
                serve.stop()
            server.stop(home=home)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "clients": args.clients,
        "rate": args.rate,
        "hang": hang,
        "caddy_killed": caddy,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"hung-replica-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
