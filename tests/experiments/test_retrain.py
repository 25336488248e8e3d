"""`stageflow retrain` and watch's retrain on a real tracking server: recipe, lineage, gates."""

from __future__ import annotations

import json

import mlflow
import pytest

from experiments import data
from experiments.retrain import PARENT_TAG, TRIGGER_TAG, retrain
from experiments.train import train
from monitoring.watch import ACTOR, watch_once
from registry import PRODUCTION, STAGING, current_version, ledger, promote, set_policy
from stageflow.errors import StageflowError

pytestmark = pytest.mark.slow

NEW_ROWS = 40


# What these tests judge is the recipe, lineage and thresholds; the latency gate (in-process,
# on a shared 2-core machine) gets a budget load alone cannot break.
RELAXED_LATENCY = {"single_row_p95_ms": 10000, "batch_p95_ms": 60000}


@pytest.fixture
def production(tracking_uri, model_name, tmp_path):
    """Version 1 of ``model_name`` (lr, C=0.5, seed 7 on builtin:wine) in Production."""
    trained = train("builtin:wine", "target", model_name, family="lr", params={"C": 0.5}, seed=7)
    relaxed = tmp_path / "relaxed.yaml"
    relaxed.write_text(json.dumps({"latency": RELAXED_LATENCY}))
    set_policy(model_name, relaxed)
    promote(model_name, trained.version, STAGING, "first")
    promote(model_name, trained.version, PRODUCTION, "first")
    return trained


@pytest.fixture
def new_rows(tmp_path):
    """Labelled rows that arrived after training (a slice of wine, as a Parquet file)."""
    path = tmp_path / "new.parquet"
    data.load("builtin:wine").sample(NEW_ROWS, random_state=3).to_parquet(path, index=False)
    return str(path)


def test_retrain_reuses_productions_recipe_and_lands_in_staging_with_its_lineage(
    production, new_rows, model_name, tracking_uri
):
    result = retrain(model_name, new_rows, trigger="drift", monitoring_run="mon-run-1")

    client = mlflow.MlflowClient(tracking_uri)
    assert result.parent_version == production.version
    assert result.version != production.version
    assert not result.refused
    assert current_version(client, model_name, STAGING) == result.version
    assert current_version(client, model_name, PRODUCTION) == production.version
    assert (result.rows, result.new_rows) == (178 + NEW_ROWS, NEW_ROWS)

    params = client.get_run(result.run_id).data.params
    assert (params["family"], params["seed"], params["model.C"]) == ("lr", "7", "0.5")
    tags = client.get_model_version(model_name, result.version).tags
    assert tags[TRIGGER_TAG] == "drift"
    assert tags[PARENT_TAG] == production.version
    assert tags["stageflow.retrain.monitoring_run"] == "mon-run-1"
    assert tags["stageflow.retrain.new_rows"] == str(NEW_ROWS)
    assert tags["stageflow.retrain.digest.new_data"] == result.digests["new_data"]
    # The candidate's run keeps the data it learned from (its temporary source is gone).
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "retrain")]
    assert artifacts == ["retrain/data.parquet"]

    (entry,) = [e for e in ledger.entries(client, model_name) if e.version == result.version]
    assert (entry.action, entry.to_stage, entry.evidence_run) == ("promote", STAGING, result.run_id)
    assert "retrain (drift) of version" in entry.reason


def test_a_retrained_candidate_can_be_retrained_again_from_its_own_runs_copy_of_the_data(
    production, new_rows, model_name, tracking_uri
):
    first = retrain(model_name, new_rows)
    promote(model_name, first.version, PRODUCTION, "the retrained one")
    second = retrain(model_name, new_rows)
    assert second.parent_version == first.version
    assert second.rows == first.rows + NEW_ROWS


def test_the_gates_can_refuse_a_retrained_candidate_and_it_stays_out_of_staging(
    production, new_rows, model_name, tracking_uri, tmp_path
):
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        json.dumps({"thresholds": {"accuracy": ">= 1.5"}, "latency": RELAXED_LATENCY})
    )
    set_policy(model_name, strict)

    result = retrain(model_name, new_rows)

    client = mlflow.MlflowClient(tracking_uri)
    assert result.refused
    assert "accuracy" in result.staging["detail"]
    assert client.get_model_version(model_name, result.version).current_stage == "None"
    assert current_version(client, model_name, STAGING) is None
    refused = [
        e for e in ledger.entries(client, model_name, include_all=True) if e.outcome == "refused"
    ]
    assert [e.version for e in refused] == [result.version]


def test_retrain_without_a_production_version_says_how_to_get_one(
    tracking_uri, model_name, new_rows
):
    train("builtin:wine", "target", model_name, family="lr")
    with pytest.raises(StageflowError, match="no Production version"):
        retrain(model_name, new_rows)


def drift_window(version: str):
    def monitor(model, since, tracking_uri, policy):
        return {
            "model": model,
            "since": since,
            "versions": [
                {
                    "version": version,
                    "role": "production",
                    "rows": 500,
                    "alarms": ["column proline drifted (PSI 0.71, p 1e-9)"],
                    "alarm_details": [
                        {
                            "kind": "drift",
                            "message": "column proline drifted (PSI 0.71, p 1e-9)",
                            "psi": 0.71,
                        }
                    ],
                    "live_metrics": None,
                    "run_id": "monitoring-run-42",
                }
            ],
        }

    return monitor


def test_a_drift_alarm_makes_watch_retrain_a_candidate_into_staging_as_stageflow_watch(
    production, new_rows, model_name, tracking_uri
):
    report = watch_once(
        model_name, "1h", monitor=drift_window(production.version), retrain_data=new_rows
    )

    (action,) = report.actions
    assert (action.kind, action.trigger, action.done) == ("retrain", "drift", True)
    client = mlflow.MlflowClient(tracking_uri)
    assert current_version(client, model_name, STAGING) == action.candidate
    tags = client.get_model_version(model_name, action.candidate).tags
    assert tags["stageflow.retrain.monitoring_run"] == "monitoring-run-42"
    (entry,) = [e for e in ledger.entries(client, model_name) if e.version == action.candidate]
    assert entry.actor == ACTOR

    # The next window with the same drift is inside the cool-down: no second candidate.
    again = watch_once(
        model_name, "1h", monitor=drift_window(production.version), retrain_data=new_rows
    )
    assert again.actions[0].skipped.startswith("cool-down")
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 2


def test_watch_dry_run_decides_a_retrain_and_changes_nothing(
    production, new_rows, model_name, tracking_uri
):
    client = mlflow.MlflowClient(tracking_uri)
    before = len(ledger.entries(client, model_name, include_all=True))
    report = watch_once(
        model_name,
        "1h",
        dry_run=True,
        monitor=drift_window(production.version),
        retrain_data=new_rows,
    )
    assert report.dry_run
    assert [(a.kind, a.done) for a in report.actions] == [("retrain", False)]
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    assert len(ledger.entries(client, model_name, include_all=True)) == before
