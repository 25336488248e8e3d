"""Writing inference-log segments in the contract's schema, as the serving writer does.

Tests of the reader and the monitor use it to put known rows in the log without a
served endpoint; the end-to-end test goes through the real writer instead.
"""

from __future__ import annotations

import itertools
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient

from monitoring import read

_seq = itertools.count()


def log_run(client: MlflowClient, model: str, version: str) -> str:
    """The inference-log run of (model, version), created the first time."""
    found = read.log_runs(client, model, [version])
    if version in found:
        return found[version]
    experiment = client.get_experiment_by_name(read.INFERENCE_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(read.INFERENCE_EXPERIMENT)
    )
    run = client.create_run(
        experiment_id,
        run_name=f"inference-{model}-v{version}",
        tags={
            read.MODEL_TAG: model,
            read.VERSION_TAG: version,
            read.KIND_TAG: read.INFERENCE_KIND,
        },
    )
    return run.info.run_id


def rows(
    model: str,
    version: str,
    inputs: pd.DataFrame,
    predictions,
    start: datetime | None = None,
    spacing: timedelta = timedelta(milliseconds=10),
    rows_per_request: int = 1,
    ids=None,
    outcome: str = "accepted",
    problem: str | None = None,
    latency_ms: float = 5.0,
    source: str = "online",
) -> pd.DataFrame:
    """Log rows for ``inputs`` answered with ``predictions`` (one request per N rows)."""
    n = len(inputs)
    start = start or datetime.now(UTC) - timedelta(minutes=5)
    index = np.arange(n)
    frame = pd.DataFrame(
        {
            "time": pd.to_datetime([start + i * spacing for i in index], utc=True),
            "model": model,
            "version": str(version),
            "source": source,
            "request_id": [
                f"req-{version}-{start:%H%M%S%f}-{i // rows_per_request}" for i in index
            ],
            "row": (index % rows_per_request).astype("int64"),
            "id": None if ids is None else [str(v) for v in ids],
            "outcome": outcome,
            "problem": problem,
            "latency_ms": float(latency_ms),
            "prediction": list(predictions),
        }
    )
    for name in inputs.columns:
        values = inputs[name]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            frame[read.INPUT_PREFIX + name] = values.to_numpy(dtype=float)
        else:
            frame[read.INPUT_PREFIX + name] = values.astype(object).where(values.notna(), None)
    return frame


def upload(client: MlflowClient, frame: pd.DataFrame, pid: int = 4242) -> str:
    """One segment of ``frame`` (one model and version) uploaded to its run; its file name."""
    model, version = frame["model"].iloc[0], frame["version"].iloc[0]
    run_id = log_run(client, model, version)
    first = frame["time"].min().to_pydatetime()
    source = frame["source"].iloc[0]
    name = f"{first:{read.TIME_FORMAT}}-{source}-{pid}-{next(_seq)}.parquet"
    schema = {"time": pa.timestamp("us", tz="UTC"), "row": pa.int64(), "id": pa.string()}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.cast(
        pa.schema([pa.field(f.name, schema.get(f.name, f.type)) for f in table.schema])
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        pq.write_table(table, path)
        client.log_artifact(run_id, str(path), read.SEGMENTS)
    return name
