"""Promote, rollback, status and history on real versions in a real registry."""

import pytest
from mlflow import MlflowClient

import registry
from registry import _lock, ledger
from registry._stages import move
from stageflow.errors import StageflowError, UsageError
from tests.helpers import assert_one_holder_per_stage

pytestmark = pytest.mark.slow


@pytest.fixture
def two_versions(register_versions, model_name):
    """Versions 1 (lr) and 2 (rf) of a fresh model."""
    assert register_versions(model_name) == ["1", "2"]
    return model_name


def resolved(name: str) -> dict[str, str | None]:
    """What Production and Staging resolve to (stage and alias agreeing is asserted)."""
    found = assert_one_holder_per_stage(MlflowClient(), name)
    return {"prod": found["Production"], "staging": found["Staging"]}


def test_promotion_moves_stage_and_alias_together_and_archives_the_previous_holder(two_versions):
    name = two_versions
    registry.promote(name, 1, "Staging", "first")
    assert resolved(name) == {"prod": None, "staging": "1"}
    registry.promote(name, 1, "production", "looks good")
    assert resolved(name) == {"prod": "1", "staging": None}

    registry.promote(name, 2, "Staging")
    result = registry.promote(name, 2, "Production", "better")
    assert result.archived == ["1"]
    assert resolved(name) == {"prod": "2", "staging": None}
    assert MlflowClient().get_model_version(name, "1").current_stage == "Archived"
    assert [c.check for c in result.checks] == [
        "from_staging",
        "loads_and_predicts",
        "thresholds",
        "schema_compatible",
        "beats_champion",
    ]


def test_production_only_from_staging_is_refused_and_changes_nothing(two_versions):
    name = two_versions
    with pytest.raises(registry.Refused, match="from_staging: version 1 is in None"):
        registry.promote(name, 1, "Production")
    assert resolved(name) == {"prod": None, "staging": None}
    assert registry.history(name) == []
    refused = ledger.entries(MlflowClient(), name, include_all=True)
    assert [(e.outcome, e.to_stage) for e in refused] == [("refused", "Production")]


def test_repeating_a_promotion_changes_nothing(two_versions):
    name = two_versions
    registry.promote(name, 1, "Staging")
    again = registry.promote(name, 1, "Staging")
    assert not again.changed
    assert len(registry.history(name)) == 1


def test_a_version_that_cannot_predict_its_example_is_refused(
    tracking_uri, model_name, untime_promotions
):
    import mlflow
    import pandas as pd

    from experiments import artifacts, data, families

    X, y, task = data.features_and_target(data.load("builtin:wine"), "target")
    pipeline = families.build("lr", task, X, seed=0).fit(X, y)
    # Logged outside Stageflow with an example whose columns the pipeline never saw.
    wrong = pd.DataFrame({"not_a_feature": [1.0, 2.0]})
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            pipeline,
            name="model",
            registered_model_name=model_name,
            input_example=wrong,
            skops_trusted_types=artifacts.trusted_types(pipeline),
        )
    untime_promotions(model_name)
    with pytest.raises(registry.Refused, match="loads_and_predicts: .* fails on its input example"):
        registry.promote(model_name, 1, "Staging")
    assert resolved(model_name)["staging"] is None


def test_unknown_model_version_and_stage_are_usage_errors(two_versions):
    with pytest.raises(UsageError, match="no registered model named 'nope'"):
        registry.promote("nope", 1, "Staging")
    with pytest.raises(UsageError, match="has no version 7; its versions: 1, 2"):
        registry.promote(two_versions, 7, "Staging")
    with pytest.raises(UsageError, match="unknown stage 'Prod'"):
        registry.promote(two_versions, 1, "Prod")
    with pytest.raises(UsageError, match="not Archived"):
        registry.promote(two_versions, 1, "Archived")


def test_rollback_returns_the_previous_production_and_is_recorded(two_versions):
    name = two_versions
    for version in (1, 2):
        registry.promote(name, version, "Staging")
        registry.promote(name, version, "Production")

    back = registry.rollback(name, reason="v2 misbehaves")

    assert back.version == "1"
    assert back.archived == ["2"]
    assert resolved(name) == {"prod": "1", "staging": None}
    last = registry.history(name)[-1]
    assert (last.action, last.version, last.from_stage, last.to_stage, last.reason) == (
        "rollback",
        "1",
        "Archived",
        "Production",
        "v2 misbehaves",
    )
    # Nothing earlier than version 1 was ever in Production.
    with pytest.raises(StageflowError, match="no earlier Production version"):
        registry.rollback(name)


def test_rollback_to_a_chosen_version(two_versions):
    name = two_versions
    registry.promote(name, 1, "Staging")
    registry.promote(name, 1, "Production")
    back = registry.rollback(name, to=2, reason="known good")
    assert resolved(name)["prod"] == "2"
    assert back.archived == ["1"]
    with pytest.raises(UsageError, match="already in Production"):
        registry.rollback(name, to=2)


def test_rollback_without_production_is_refused(two_versions):
    with pytest.raises(StageflowError, match="no Production version to roll back from"):
        registry.rollback(two_versions)


def test_history_lists_every_transition_with_actor_and_reason(two_versions, monkeypatch):
    monkeypatch.setenv("STAGEFLOW_ACTOR", "oncall@example")
    name = two_versions
    registry.promote(name, 1, "Staging", "first candidate")
    registry.promote(name, 1, "Production", "ship it")
    entries = registry.history(name)
    assert [(e.version, e.from_stage, e.to_stage, e.reason, e.actor) for e in entries] == [
        ("1", "None", "Staging", "first candidate", "oncall@example"),
        ("1", "Staging", "Production", "ship it", "oncall@example"),
    ]
    assert all(e.outcome == "done" for e in entries)


def test_status_reports_holders_and_flags_changes_made_outside_stageflow(two_versions):
    name = two_versions
    registry.promote(name, 1, "Staging")
    registry.promote(name, 1, "Production")
    st = registry.status(name)
    assert (st.production, st.staging, st.problems) == ("1", None, [])
    assert st.last_transition["to_stage"] == "Production"

    # Someone puts version 2 in Production through MLflow directly, without the alias.
    MlflowClient().transition_model_version_stage(name, "2", "Production")
    st = registry.status(name)
    assert any("Production is held by versions 1, 2" in p for p in st.problems)

    move(MlflowClient(), name, "1", "Production")
    assert registry.status(name).problems == []


def test_status_flags_an_interrupted_transition(two_versions):
    name = two_versions
    client = MlflowClient()
    entry = ledger.Entry(name, "1", "None", "Staging", "promote", "someone", "")
    lease = _lock.acquire(client, name, "someone")
    ledger.begin(client, entry, lease)  # as if the promoter died before finishing
    lease.release()
    problems = registry.status(name).problems
    assert any("was interrupted" in p and entry.run_id in p for p in problems)
