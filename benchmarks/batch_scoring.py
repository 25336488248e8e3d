"""Batch scoring: local chunked scoring against Spark ``local[N]``, in the same run.

One invocation starts Stageflow's tracking server on a free port in a temporary
folder, trains one version on a delivery-style table (numeric columns, two
categorical ones, gaps in both kinds) and puts it in Production, then runs
``stageflow score`` as users do (a fresh process each time, ``--json``):

- ``local`` on ``--rows`` rows (default 1,000,000) and on ``--big-rows`` rows
  (default 5,000,000): rows/s and peak memory, to show memory stays flat;
- ``spark`` (``--spark-master local[2]``) on a tiny input (Spark's fixed cost: the
  JVM, the session, the UDF's model load) and on ``--rows`` rows.

Peak memory is the largest resident set of the command's whole process tree (the
Python process, Spark's JVM and its Python workers), sampled every 0.1 s with psutil.
Figures go to ``benchmarks/results/batch-*.json`` (ignored by git).

Usage:
    .venv/bin/python benchmarks/batch_scoring.py [--rows 1000000] [--big-rows 5000000]
        [--spark-master local[2]] [--family hgb]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout, installed or not

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from experiments.train import train  # noqa: E402
from registry._stages import PRODUCTION, move  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
TARGET = "delivery_minutes"
REGIONS = ["north", "south", "east", "west", "centre", "harbour", "airport", "old-town"]
VEHICLES = ["bike", "scooter", "car", "van"]
WRITE_ROWS = 250_000  # rows per generated Parquet row group (bounded memory while writing)


def delivery_table(rows: int, seed: int, target: bool = True) -> pd.DataFrame:
    """Deliveries: distance, weight, hour, items (numeric), region, vehicle (categorical);
    weight and region have gaps."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "distance_km": rng.gamma(2.0, 2.5, rows).round(2),
            # Bounded, so that millions of input rows stay inside the range the contract
            # learned from 20,000 training rows (an unbounded tail gets refused, correctly).
            "weight_kg": rng.lognormal(1.0, 0.6, rows).clip(0.2, 20.0).round(2),
            "hour": rng.integers(7, 23, rows).astype(float),
            "items": rng.integers(1, 12, rows).astype(float),
            "region": rng.choice(REGIONS, rows).astype(object),
            "vehicle": rng.choice(VEHICLES, rows).astype(object),
        }
    )
    if target:
        speed = frame["vehicle"].map({"bike": 12, "scooter": 20, "car": 25, "van": 22})
        frame[TARGET] = (
            10 + 60 * frame["distance_km"] / speed + 0.8 * frame["items"] + rng.normal(0, 3, rows)
        ).round(1)
    frame.loc[rng.random(rows) < 0.05, "weight_kg"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "region"] = None
    return frame


def write_input(path: Path, rows: int, seed: int) -> None:
    writer = None
    try:
        for start in range(0, rows, WRITE_ROWS):
            part = delivery_table(min(WRITE_ROWS, rows - start), seed + start, target=False)
            table = pa.Table.from_pandas(part, preserve_index=False)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def measured(args: list[str], env: dict) -> dict:
    """Run a command; its wall seconds, its JSON output, and its tree's peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=3600)
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} failed: {err.decode()[-2000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20), **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=5_000_000)
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--family", default="hgb")
    parser.add_argument(
        "--engines", default="local,spark", help="which engines to run (local alone: memory)"
    )
    opts = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="stageflow-bench-batch-"))
    info = server.start(port=processes.free_port(), home=home / "server", tie_to_parent=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": info.uri}
    figures: dict = {}
    try:
        training = home / "deliveries.csv"
        delivery_table(20_000, seed=0).to_csv(training, index=False)
        trained = train(str(training), TARGET, "deliveries", opts.family, tracking_uri=info.uri)
        from mlflow import MlflowClient

        move(MlflowClient(info.uri), "deliveries", trained.version, PRODUCTION)

        inputs = {"tiny": 1_000, "rows": opts.rows, "big": opts.big_rows}
        paths = {}
        for key, rows in inputs.items():
            paths[key] = home / f"in-{rows}.parquet"
            write_input(paths[key], rows, seed=100)

        def stageflow_score(key: str, engine: str) -> dict:
            folder = home / f"out-{engine}-{key}"
            folder.mkdir()
            out = folder / ("scored.parquet" if engine == "local" else "parts")
            args = [sys.executable, "-m", "stageflow", "score", "--model", "deliveries"]
            args += ["--input", str(paths[key]), "--output", str(out), "--json"]
            args += ["--engine", engine]
            if engine == "spark":
                args += ["--spark-master", opts.spark_master]
            figure = measured(args, env)
            figure["rows_per_second"] = round(figure["rows"] / figure["seconds"])
            print(
                f"{engine:5} {figure['rows']:>9,} rows: {figure['seconds']:7.1f} s scoring, "
                f"{figure['wall_s']:7.1f} s wall, {figure['rows_per_second']:>9,} rows/s, "
                f"peak {figure['peak_rss_mb']:,} MB",
                flush=True,
            )
            return figure

        engines = opts.engines.split(",")
        for key, engine in (
            ("tiny", "local"),
            ("tiny", "spark"),
            ("rows", "local"),
            ("rows", "spark"),
            ("big", "local"),
        ):
            if engine in engines:
                figures[f"{engine}-{key}"] = stageflow_score(key, engine)
    finally:
        server.stop(home / "server")
        shutil.rmtree(home, ignore_errors=True)

    local = figures["local-rows"]
    summary = {}
    if "spark-rows" in figures:
        spark = figures["spark-rows"]
        fixed = figures["spark-tiny"]["wall_s"] - figures["local-tiny"]["wall_s"]
        summary["spark_fixed_cost_s"] = round(fixed, 1)
        summary["spark_vs_local_rows_per_second"] = round(
            spark["rows_per_second"] / local["rows_per_second"], 2
        )
    summary |= {
        "local_peak_mb_at_rows_and_big": [
            local["peak_rss_mb"],
            figures["local-big"]["peak_rss_mb"],
        ],
    }
    print(json.dumps(summary))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "when": stamp,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(),
        },
        "options": vars(opts),
        "figures": figures,
        "summary": summary,
    }
    (RESULTS_DIR / f"batch-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
