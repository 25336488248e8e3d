"""The monitor over a large inference log, and Evidently's data-drift report on the same rows.

One invocation starts a tracking server in a temporary folder, trains a linear
regression on 20,000 rows of an 8-column table (6 numeric, 2 categorical), logs
``--sizes`` rows (default 100,000, 300,000 and 1,000,000) to the inference log of
one registered model per size -- Parquet segments of 200,000 rows in the contract's
schema, uploaded to the tracking server as the serving writer does -- with three
columns shifted (``n2`` by one standard deviation, ``n5`` twice as spread, ``c1``'s
categories reweighted), and then:

- runs ``monitoring.monitor`` in a fresh child process per size, which reports its
  wall and CPU time (download, read, statistics, the MLflow run and its report) and its
  peak resident memory (``VmHWM``: ``ru_maxrss`` would carry the parent's peak across
  fork and exec), beside the same figure before the monitor ran;
- runs Evidently's ``DataDriftPreset`` report (its default tests and thresholds) on
  the same rows -- the reference rows the model was trained on and the logged input
  columns -- in the Python given by ``--evidently`` (a separate virtualenv: Evidently
  0.7 does not import under pandas 3); its time is the report alone, the frames
  already in memory;

and prints which columns each flagged. Results go to ``benchmarks/results/``.

Usage:
    python3 -m venv /tmp/evidently-venv
    /tmp/evidently-venv/bin/pip install "evidently>=0.7,<0.8" "pandas<3" pyarrow
    .venv/bin/python benchmarks/monitor_drift.py --evidently /tmp/evidently-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from monitoring import read  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
REFERENCE_ROWS = 20_000
SEGMENT_ROWS = 200_000  # the serving writer's segment size
ROWS_PER_REQUEST = 10
SHIFTED = ["c1", "n2", "n5"]
NUMERIC = [f"n{i}" for i in range(1, 7)]
CATEGORICAL = ["c1", "c2"]

MONITOR_CHILD = """
import json, os, sys, time
import monitoring
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
cpu = time.process_time()
started = time.perf_counter()
result = monitoring.monitor(sys.argv[1], since="1h")
seconds = time.perf_counter() - started
cpu = time.process_time() - cpu
(v,) = result.versions
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rows": v.rows,
                  "drifted": v.drifted_columns, "prediction_drift": v.prediction_drift,
                  "rss_before_mb": base, "load_average": os.getloadavg(),
                  "peak_rss_mb": hwm()}))
"""

EVIDENTLY_CHILD = """
import json, os, sys, time
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
reference = pd.read_parquet(sys.argv[1])
current = pd.read_parquet(sys.argv[2])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
cpu = time.process_time()
started = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(current_data=current, reference_data=reference)
document = snapshot.dict()
seconds = time.perf_counter() - started
cpu = time.process_time() - cpu
drifted, methods = [], {}
for metric in document["metrics"]:
    config = metric.get("config", {})
    if config.get("type", "").endswith("ValueDrift"):
        column = config["column"]
        methods[column] = config.get("method")
        distance = config.get("method", "").startswith(("Wasserstein", "Jensen", "PSI", "Kullback"))
        value, threshold = metric["value"], config["threshold"]
        if (value >= threshold) if distance else (value < threshold):
            drifted.append(column)
import evidently
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "drifted": sorted(drifted),
                  "methods": methods, "version": evidently.__version__,
                  "rss_before_mb": base, "load_average": os.getloadavg(),
                  "peak_rss_mb": hwm()}))
"""


def draw(n: int, seed: int, shifted: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "n1": rng.normal(0, 1, n),
            "n2": rng.normal(1 if shifted else 0, 1, n),
            "n3": rng.uniform(0, 10, n),
            "n4": rng.exponential(2, n),
            # Twice as spread, kept inside what the guarded model accepts (a served log
            # holds no rows the contract refused).
            "n5": np.clip(rng.normal(50, 20, n), 0, 100) if shifted else rng.normal(50, 10, n),
            "n6": rng.gamma(2, 2, n),
            "c1": rng.choice(["a", "b", "c"], n, p=[0.2, 0.3, 0.5] if shifted else [0.5, 0.3, 0.2]),
            "c2": rng.choice(["x", "y", "z", "w"], n, p=[0.4, 0.3, 0.2, 0.1]),
        }
    )
    frame["y"] = (
        frame["n1"]
        + 0.5 * frame["n2"]
        - 0.2 * frame["n3"]
        + 0.05 * frame["n5"]
        + frame["c1"].map({"a": 1.0, "b": 0.0, "c": -1.0})
        + rng.normal(0, 0.3, n)
    )
    return frame


def log_rows(client: MlflowClient, name: str, version: str, model, rows: int, tmp: Path) -> Path:
    """``rows`` shifted rows in the log of (name, version); the inputs as one Parquet file."""
    run = client.create_run(
        _experiment(client),
        run_name=f"inference-{name}-v{version}",
        tags={read.MODEL_TAG: name, read.VERSION_TAG: version, read.KIND_TAG: read.INFERENCE_KIND},
    )
    inputs_path = tmp / f"live-{rows}.parquet"
    writer = None
    start = datetime.now(UTC) - timedelta(minutes=30)
    for i, offset in enumerate(range(0, rows, SEGMENT_ROWS)):
        n = min(SEGMENT_ROWS, rows - offset)
        inputs = draw(n, seed=100 + i, shifted=True).drop(columns="y")
        predictions = np.asarray(model.predict(inputs), dtype=float)
        index = np.arange(offset, offset + n)
        times = pd.to_datetime(start, utc=True) + pd.to_timedelta(index, unit="ms")
        frame = pd.DataFrame(
            {
                "time": times,
                "model": name,
                "version": version,
                "source": "online",
                "request_id": [f"req-{j // ROWS_PER_REQUEST}" for j in index],
                "row": (index % ROWS_PER_REQUEST).astype("int64"),
                "id": pd.Series([None] * n, dtype="string"),
                "outcome": "accepted",
                "problem": pd.Series([None] * n, dtype="string"),
                "latency_ms": 4.0 + (index % 7),
                "prediction": predictions,
                **{read.INPUT_PREFIX + c: inputs[c] for c in inputs.columns},
            }
        )
        table = pa.Table.from_pandas(frame, preserve_index=False)
        segment = tmp / f"{times[0]:%Y%m%dT%H%M%S%fZ}-online-1-{i}.parquet"
        pq.write_table(table, segment)
        client.log_artifact(run.info.run_id, str(segment), read.SEGMENTS)
        segment.unlink()
        live = pa.Table.from_pandas(inputs, preserve_index=False)
        writer = writer or pq.ParquetWriter(inputs_path, live.schema)
        writer.write_table(live)
    writer.close()
    client.set_terminated(run.info.run_id)
    return inputs_path


def _experiment(client: MlflowClient) -> str:
    found = client.get_experiment_by_name(read.INFERENCE_EXPERIMENT)
    return found.experiment_id if found else client.create_experiment(read.INFERENCE_EXPERIMENT)


def child(python: str, code: str, *args: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        env=processes.venv_env(env or {}),
        timeout=1800,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--evidently", metavar="PYTHON", help="a Python with evidently 0.7")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="stageflow-bench-monitor-") as folder:
        tmp = Path(folder)
        info = server.start(port=processes.free_port(), home=tmp / "home", tie_to_parent=True)
        try:
            results = run(info.uri, sizes, tmp, args.evidently)
        finally:
            server.stop(tmp / "home")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"monitor_drift-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {out}")


def run(uri: str, sizes: list[int], tmp: Path, evidently: str | None) -> dict:
    from experiments.train import train

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    reference_rows = draw(REFERENCE_ROWS, seed=1)
    reference_rows.to_parquet(tmp / "reference.parquet")
    trained = train(
        str(tmp / "reference.parquet"), "y", model_name="bench", family="lr", tracking_uri=uri
    )
    source = client.get_model_version("bench", trained.version).source
    model = mlflow.pyfunc.load_model(f"models:/bench/{trained.version}")
    reference_inputs = tmp / "reference-inputs.parquet"
    reference_rows.drop(columns="y").to_parquet(reference_inputs)
    results = {
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "shifted": SHIFTED,
        "runs": [],
    }
    print(f"{'rows':>10} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'(before)':>8}  flagged")
    for rows in sizes:
        name = f"bench-{rows}"
        version = str(mlflow.register_model(source, name).version)
        live = log_rows(client, name, version, model, rows, tmp)
        ours = child(sys.executable, MONITOR_CHILD, name, env={"MLFLOW_TRACKING_URI": uri})
        entry = {"rows": rows, "stageflow": ours}
        print(
            f"{rows:>10} {ours['seconds']:>8.2f} {ours['cpu_seconds']:>8.2f} "
            f"{ours['peak_rss_mb']:>8.0f} "
            f"{ours['rss_before_mb']:>8.0f}  {', '.join(ours['drifted'])}"
        )
        if evidently:
            theirs = child(evidently, EVIDENTLY_CHILD, str(reference_inputs), str(live))
            entry["evidently"] = theirs
            print(
                f"{'':>10} {theirs['seconds']:>8.2f} {theirs['cpu_seconds']:>8.2f} "
                f"{theirs['peak_rss_mb']:>8.0f} "
                f"{theirs['rss_before_mb']:>8.0f}  {', '.join(theirs['drifted'])}  (Evidently "
                f"{theirs['version']})"
            )
        live.unlink()
        results["runs"].append(entry)
    return results


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
