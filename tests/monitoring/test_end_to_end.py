"""Requests through the real front door → the inference log → labels → the monitor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

import monitoring
from experiments import data
from registry import promote

pytestmark = pytest.mark.slow
pytest.importorskip("serving.inference_log", reason="needs the inference log's writer")

ID_COLUMN = "order_id"
START_TIMEOUT_S = 120.0


def test_served_requests_are_monitored_with_drift_and_labels_joined_on_the_id_column(
    tracking_uri,
    register_versions,
    model_name,
    start_serving,
    tmp_path,
):
    v1, _ = register_versions(model_name)  # lr and rf on builtin:wine
    promote(model_name, v1, "Staging")
    promote(model_name, v1, "Production")
    running = start_serving(
        model_name,
        replicas=1,
        model_config={"inference_log": {"id_column": ID_COLUMN, "flush_seconds": 1.0}},
    )
    assert running.wait_serving(timeout=START_TIMEOUT_S) == v1

    wine = data.load("builtin:wine")
    rows = wine.sample(300, replace=True, random_state=3).reset_index(drop=True)
    features = rows.drop(columns=[data.BUILTIN_TARGET])
    features["alcohol"] += 1.5  # shifted, still inside what the guard accepts
    features[ID_COLUMN] = [f"order-{i}" for i in range(len(rows))]
    for start in range(0, len(features), 10):
        chunk = features.iloc[start : start + 10]
        body = {"dataframe_split": chunk.to_dict(orient="split", index=False)}
        answer = requests.post(running.url + "/invocations", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
    running.stop()  # flushes and uploads what is buffered

    labels = pd.DataFrame({ID_COLUMN: features[ID_COLUMN], "target": rows[data.BUILTIN_TARGET]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    stored = monitoring.feedback(model_name, tmp_path / "labels.csv", id_column=ID_COLUMN)
    assert stored.matched == 300
    assert stored.unknown == 0

    result = monitoring.monitor(model_name, since="1h")
    (report,) = [v for v in result.versions if v.version == v1]
    assert report.role == "production"
    assert report.rows == 300
    assert report.requests == 30
    assert report.latency_p50_ms > 0
    assert "alcohol" in report.drifted_columns
    assert report.live is not None
    assert report.live.rows == 300
    assert report.live.metric == "accuracy"
    assert 0 <= report.live.low <= report.live.value <= report.live.high <= 1
    assert np.isfinite(report.live.test_value)
    run = MlflowClient(tracking_uri).get_run(report.run_id)
    assert run.data.tags["stageflow.role"] == "production"
    assert run.data.metrics["psi.alcohol"] > 0.2
