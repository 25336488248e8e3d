"""The inference log's cost on the request path, in-process: no server, no network.

An ASGI app that answers at once (and fills in the log record as the guarded model
does: references to a 1×30 float matrix and one prediction) is called 20,000 times
bare, behind ``RequestIds`` without a log (the request id only) and behind
``RequestIds`` with a started ``InferenceLog`` (the writer thread runs in the same
process, as in a replica). Prints µs per request for three rounds.

Usage:
    .venv/bin/python benchmarks/inference_log_overhead.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout

import numpy as np

from serving.inference_log import (
    InferenceLog,
    LogSettings,
    RequestIds,
    current_request,
)

NUMERIC = np.random.default_rng(0).random((1, 30))
PREDICTION = np.array([1])
SCOPE = {
    "type": "http",
    "path": "/invocations",
    "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"front-door-id")],
}


async def app(scope, receive, send):
    note = current_request()
    if note is not None:
        note.numeric, note.categorical, note.predictions = NUMERIC, [], PREDICTION
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def send(message):
    pass


async def receive():
    return {}


async def per_request_us(asgi, n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        await asgi(SCOPE, receive, send)
    return (time.perf_counter() - began) / n * 1e6


async def measure(log: InferenceLog, n: int) -> None:
    for round_ in range(3):
        bare = await per_request_us(app, n)
        ids = await per_request_us(RequestIds(app, None), n)
        logged = await per_request_us(RequestIds(app, log), n)
        print(
            f"round {round_}: bare {bare:.1f} µs, request id {ids:.1f} µs, "
            f"request id + log {logged:.1f} µs per request"
        )
        log.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stageflow-log-bench-") as tmp:
        settings = LogSettings(model="bench", version="1", directory=tmp, upload=False)
        columns = [f"c{i}" for i in range(NUMERIC.shape[1])]
        log = InferenceLog(settings, columns, []).start()
        asyncio.run(measure(log, args.requests))
        log.close()
        print(f"rows written {log.written}, dropped {log.dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
