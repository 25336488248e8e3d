"""The monitor on a real tracking server, over log segments written in the contract's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import log_loss

import monitoring
from monitoring import labels as labelling
from monitoring import reference
from tests.monitoring import segments
from tests.monitoring.conftest import FEATURES, draw

pytestmark = pytest.mark.slow


def _log(client, name, version, model, frame, ids=None, rows_per_request=1):
    inputs = frame[FEATURES]
    logged = segments.rows(
        name, version, inputs, model.predict(inputs), ids=ids, rows_per_request=rows_per_request
    )
    for part in (logged.iloc[: len(logged) // 2], logged.iloc[len(logged) // 2 :]):
        segments.upload(client, part)
    return logged


def test_fresh_rows_from_the_training_distribution_raise_no_alarm(tracking_uri, synthetic_version):
    name, version, model = synthetic_version
    _log(MlflowClient(tracking_uri), name, version, model, draw(1500, seed=11), rows_per_request=3)
    result = monitoring.monitor(name, since="1h")
    (report,) = result.versions
    assert report.version == version
    assert report.rows == 1500
    assert report.requests == 500
    assert report.drifted_columns == []
    assert not report.prediction_drift
    assert report.alarms == []
    assert report.reference_source == reference.FROM_TRAINING


def test_drift_is_raised_on_exactly_the_shifted_columns_and_recorded_in_mlflow(
    tracking_uri, synthetic_version
):
    name, version, model = synthetic_version
    _log(MlflowClient(tracking_uri), name, version, model, draw(1500, seed=12, shifted=True))
    result = monitoring.monitor(name, since="1h")
    (report,) = result.versions
    assert report.drifted_columns == ["a", "colour"]
    kinds = {(a["kind"], a.get("column")) for a in report.alarm_details}
    assert {("drift", "a"), ("drift", "colour")} <= kinds
    document = result.to_json()
    assert set(document) == {"model", "since", "versions"}
    assert document["versions"][0]["drifted_columns"] == ["a", "colour"]

    client = MlflowClient(tracking_uri)
    run = client.get_run(report.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == monitoring.MONITORING_EXPERIMENT
    assert run.data.tags["stageflow.model"] == name
    assert run.data.tags["stageflow.version"] == version
    assert run.data.tags["stageflow.kind"] == "monitor"
    assert run.data.tags["stageflow.policy"] == "default"
    assert run.data.metrics["psi.a"] > 0.2
    assert run.data.metrics["psi.b"] < 0.2
    assert run.data.metrics["drifted_columns"] == 2
    assert run.data.metrics["rows"] == 1500
    listed = {f.path for f in client.list_artifacts(report.run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/plots"} <= listed
    plots = {Path(f.path).name for f in client.list_artifacts(report.run_id, "report/plots")}
    assert {"a.png", "colour.png"} <= plots
    assert "b.png" not in plots


def test_too_few_rows_say_not_enough_rows_instead_of_an_alarm(tracking_uri, synthetic_version):
    name, version, model = synthetic_version
    _log(MlflowClient(tracking_uri), name, version, model, draw(60, seed=13, shifted=True))
    (report,) = monitoring.monitor(name, since="1h").versions
    assert report.drifted_columns == []
    assert report.alarms == []
    assert any("not enough rows" in note for note in report.notes)


def test_live_performance_from_labels_and_an_alarm_when_outside_the_margin(
    tracking_uri, synthetic_version, tmp_path
):
    name, version, model = synthetic_version
    frame = draw(800, seed=14)
    orders = [f"order-{i}" for i in range(len(frame))]
    _log(MlflowClient(tracking_uri), name, version, model, frame, ids=orders)
    truth = pd.DataFrame({"order": orders, "label": frame["label"]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    stored = monitoring.feedback(name, tmp_path / "truth.csv", id_column="order")
    assert stored.matched == 800
    assert stored.unknown == 0

    (report,) = monitoring.monitor(name, since="1h").versions
    live = report.live
    assert live.metric == "accuracy"
    assert live.rows == 800
    assert live.low <= live.value <= live.high
    assert abs(live.value - live.test_value) < 0.05
    assert not [a for a in report.alarm_details if a["kind"] == "live_metric"]
    # Log loss: the labelled rows re-scored by the version itself (the log holds labels only).
    pipeline = model.unwrap_python_model().pipeline
    expected = log_loss(
        frame["label"], pipeline.predict_proba(frame[FEATURES]), labels=pipeline.classes_
    )
    assert live.others["log_loss"] == pytest.approx(expected, rel=1e-6)
    low, high = live.intervals["log_loss"]
    assert low < live.others["log_loss"] < high
    assert "log_loss" in live.test_others
    run_metrics = MlflowClient(tracking_uri).get_run(report.run_id).data.metrics
    assert run_metrics["live_log_loss"] == pytest.approx(live.others["log_loss"])
    assert run_metrics["live_log_loss_low"] == pytest.approx(low)

    # Later feedback for the same orders overrides: a third of them were wrong after all.
    wrong = truth.copy()
    flip = wrong.index % 3 == 0
    wrong.loc[flip, "label"] = wrong.loc[flip, "label"].map({"yes": "no", "no": "yes"})
    wrong.to_parquet(tmp_path / "corrected.parquet")
    monitoring.feedback(name, tmp_path / "corrected.parquet", id_column="order")
    (report,) = monitoring.monitor(name, since="1h").versions
    assert report.live.value < report.live.test_value - 0.2
    (alarm,) = [a for a in report.alarm_details if a["kind"] == "live_metric"]
    assert alarm["high"] < alarm["bound"]
    metrics = MlflowClient(tracking_uri).get_run(report.run_id).data.metrics
    assert metrics["live_accuracy"] == pytest.approx(report.live.value)
    assert "test_accuracy" in metrics


def test_feedback_counts_unknown_ids_and_keeps_them(tracking_uri, synthetic_version, tmp_path):
    name, version, model = synthetic_version
    frame = draw(20, seed=15)
    logged = _log(MlflowClient(tracking_uri), name, version, model, frame)
    known = logged[["request_id", "row"]].assign(label=frame["label"].to_numpy())
    unknown = pd.DataFrame({"request_id": ["nobody-1", "nobody-2"], "row": 0, "label": "yes"})
    pd.concat([known, unknown]).to_csv(tmp_path / "labels.csv", index=False)
    result = monitoring.feedback(name, tmp_path / "labels.csv")
    assert result.key == ["request_id", "row"]
    assert result.rows == 22
    assert result.matched == 20
    assert result.unknown == 2
    assert result.unknown_examples == ["nobody-1#0", "nobody-2#0"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["stageflow.kind"] == "feedback"
    assert run.data.metrics["unknown_ids"] == 2
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{name}-labels"]
    stored = pd.read_parquet(client.download_artifacts(result.run_id, labelling.LABELS_ARTIFACT))
    assert len(stored) == 22


def test_a_version_logged_without_a_reference_is_compared_with_its_test_split(
    tracking_uri, model_name, tmp_path, monkeypatch
):
    from experiments.train import train

    draw(1500, seed=2).to_parquet(tmp_path / "old.parquet")
    # As a version logged before references: the model holds no reference.json.
    # (Its own context: `monkeypatch.undo()` would also undo the fixture's tracking URI.)
    with monkeypatch.context() as patch:
        patch.setattr(reference, "FILE_NAME", "not-a-reference.json")
        trained = train(str(tmp_path / "old.parquet"), "label", model_name=model_name, family="lr")
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{trained.version}")
    _log(MlflowClient(tracking_uri), model_name, trained.version, model, draw(600, 16, True))
    (report,) = monitoring.monitor(model_name, since="1h").versions
    assert report.reference_source == reference.FROM_TEST_SPLIT
    assert any("test split" in note for note in report.notes)
    assert report.drifted_columns == ["a", "colour"]
    document = json.loads(
        Path(
            MlflowClient(tracking_uri).download_artifacts(
                report.run_id, "report/report.json", str(tmp_path)
            )
        ).read_text()
    )
    assert document["reference"]["source"] == reference.FROM_TEST_SPLIT


def test_read_log_returns_the_window_s_rows(tracking_uri, synthetic_version):
    name, version, model = synthetic_version
    _log(MlflowClient(tracking_uri), name, version, model, draw(30, seed=17))
    frame = monitoring.read_log(name, since="1h")
    assert len(frame) == 30
    assert set(frame["version"]) == {version}
    assert len(monitoring.read_log(name, since="1s")) == 0
