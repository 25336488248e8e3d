"""``stageflow feedback`` / ``stageflow monitor`` as schedulers and people call them.

Against the real server, the commands run in this interpreter (``tests.helpers.in_process``):
their subject is what each command prints and exits with, not the start of a process.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.helpers import in_process
from tests.monitoring import segments
from tests.monitoring.conftest import FEATURES, draw
from tests.stageflow.test_cli import assert_one_line_error, stageflow
from tests.test_mlproject import mlflow_run


def _log(tracking_uri, synthetic_version, frame):
    name, version, model = synthetic_version
    inputs = frame[FEATURES]
    logged = segments.rows(name, version, inputs, model.predict(inputs))
    segments.upload(MlflowClient(tracking_uri), logged)
    return logged


@pytest.mark.parametrize("since", ["5q", "0s", "h"])
def test_a_bad_window_is_a_one_line_usage_error(since):
    result = stageflow("monitor", "--model", "m", "--since", since)
    assert_one_line_error(result, 2, "--since")


@pytest.mark.slow
def test_fail_on_alarm_exits_1_on_drift_and_0_without(tracking_uri, synthetic_version, capsys):
    name, _, _ = synthetic_version
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    _log(tracking_uri, synthetic_version, draw(400, seed=21))
    calm = in_process(capsys, "monitor", "--model", name, "--fail-on-alarm", "--json", env=env)
    assert calm.returncode == 0, calm.stderr
    document = json.loads(calm.stdout)
    assert set(document) == {"model", "since", "versions"}
    assert document["since"] == "1h"
    (version,) = document["versions"]
    assert set(version) == {
        "version",
        "role",
        "rows",
        "requests",
        "drifted_columns",
        "prediction_drift",
        "live_metrics",
        "alarms",
        "alarm_details",
        "run_id",
    }
    assert version["alarms"] == []
    assert version["live_metrics"] is None

    _log(tracking_uri, synthetic_version, draw(2000, seed=22, shifted=True))
    alarmed = in_process(capsys, "monitor", "--model", name, "--fail-on-alarm", env=env)
    assert alarmed.returncode == 1, alarmed.stderr
    assert "ALARM: input drift in 'a'" in alarmed.stdout
    without_flag = in_process(capsys, "monitor", "--model", name, "--json", env=env)
    assert without_flag.returncode == 0, without_flag.stderr
    assert json.loads(without_flag.stdout)["versions"][0]["drifted_columns"] == ["a", "colour"]


@pytest.mark.slow
def test_feedback_reports_unknown_ids_in_json(tracking_uri, synthetic_version, tmp_path, capsys):
    name, _, _ = synthetic_version
    logged = _log(tracking_uri, synthetic_version, draw(10, seed=23))
    labels = pd.DataFrame({"request_id": [*logged["request_id"], "ghost"], "label": ["yes"] * 11})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    result = in_process(
        capsys,
        *("feedback", "--model", name, "--labels", str(tmp_path / "labels.csv"), "--json"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["matched"] == 10
    assert document["unknown"] == 1
    assert document["unknown_examples"] == ["ghost#0"]
    missing = in_process(
        capsys, "feedback", "--model", name, "--labels", str(tmp_path / "nope.csv"), env=env
    )
    assert_one_line_error(missing, 2, "does not exist")


@pytest.mark.slow
def test_mlflow_run_monitor_and_feedback_run_the_same_functions(
    tracking_uri, synthetic_version, tmp_path
):
    name, version, _ = synthetic_version
    logged = _log(tracking_uri, synthetic_version, draw(300, seed=24, shifted=True))
    labels = logged[["request_id"]].assign(label="yes")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    mlflow_run("feedback", tracking_uri, model=name, labels=str(tmp_path / "labels.csv"))
    mlflow_run("monitor", tracking_uri, model=name, since="2h")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("stageflow-monitoring")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`stageflow.model` = '{name}'"
    )
    kinds = sorted(r.data.tags["stageflow.kind"] for r in runs)
    assert kinds == ["feedback", "monitor"]
    (run,) = [r for r in runs if r.data.tags["stageflow.kind"] == "monitor"]
    assert run.data.tags["stageflow.version"] == version
    assert run.data.tags["stageflow.since"] == "2h"
    assert run.data.metrics["labelled_rows"] == 300
    assert run.data.metrics["drifted_columns"] == 2
    assert "stageflow.project_run_id" in run.data.tags
