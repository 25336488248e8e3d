"""Gates on real trained versions: thresholds, schema, latency, champion vs challenger, reports."""

import json
import uuid

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

import registry
from registry import _compare, ledger
from registry.policy import parse
from stageflow.errors import UsageError
from tests.helpers import UNTIMED_LATENCY_YAML, in_process

# --- policies and the bootstrap: no server --------------------------------------------


def test_a_partial_policy_keeps_the_defaults_and_names_its_source():
    policy = parse({"comparison": {"margin": 0.1}}, "file p.yaml")
    assert policy.comparison["margin"] == 0.1
    assert policy.comparison["resamples"] == 1000
    assert [str(t) for t in policy.thresholds] == ["accuracy >= 0.5", "r2 >= 0"]
    assert policy.to_json()["source"] == "file p.yaml"


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"threshold": {}}, "unknown section(s) threshold"),
        ({"latency": {"p95": 3}}, "unknown key latency.p95"),
        ({"thresholds": {"acuracy": ">= 0.8"}}, "unknown metric 'acuracy'"),
        ({"thresholds": {"accuracy": "=> 0.8"}}, "is not a rule"),
        ({"comparison": {"require_improvement": "yes"}}, "true or false"),
        ({"comparison": {"confidence": 1.5}}, "confidence must be in"),
    ],
)
def test_a_policy_with_an_unknown_or_bad_entry_fails_loudly(document, fragment):
    with pytest.raises(UsageError, match=None) as raised:
        parse(document, "test")
    assert fragment in str(raised.value)


def test_paired_bootstrap_orients_the_interval_so_positive_means_better():
    rng = np.random.default_rng(1)
    champion = (rng.random(400) < 0.7).astype(float)
    challenger = np.maximum(champion, (rng.random(400) < 0.3).astype(float))
    low, high, point = _compare.paired_bootstrap(challenger, champion, "accuracy", True, 500, 0.95)
    assert 0 < low <= point <= high
    low, high, point = _compare.paired_bootstrap(champion, champion, "accuracy", True, 500, 0.95)
    assert low == high == point == 0
    # RMSE: lower is better, so a challenger with smaller errors shows a positive improvement.
    low, _, point = _compare.paired_bootstrap(champion * 0.5, champion, "rmse", False, 500, 0.95)
    assert point > 0
    assert low > 0


# --- on real versions -----------------------------------------------------------------


@pytest.fixture(scope="module")
def extra_wine_models(tracking_server, tmp_path_factory):
    """Sources of two more trained wine versions: a clearly worse one, one with a renamed column."""
    from experiments import data
    from experiments.train import train

    name = f"session-extra-{uuid.uuid4().hex[:6]}"
    csv = tmp_path_factory.mktemp("renamed") / "wine-renamed.csv"
    data.load("builtin:wine").rename(columns={"alcohol": "alcohol_pct"}).to_csv(csv, index=False)
    worse = train(
        "builtin:wine", "target", name, family="lr", params={"max_iter": 1},
        tracking_uri=tracking_server.uri,
    )  # fmt: skip
    renamed = train(str(csv), "target", name, family="lr", tracking_uri=tracking_server.uri)
    client = MlflowClient(tracking_server.uri)
    return {
        "worse": client.get_model_version(name, worse.version).source,
        "renamed": client.get_model_version(name, renamed.version).source,
    }


@pytest.fixture
def wine(register_versions, extra_wine_models, model_name):
    """Versions 1 (lr), 2 (rf), 3 (lr with max_iter=1), 4 (lr on a renamed column)."""
    register_versions(model_name)
    for key in ("worse", "renamed"):
        mlflow.register_model(extra_wine_models[key], model_name)
    return model_name


def write_policy(tmp_path, text: str) -> str:
    path = tmp_path / f"policy-{uuid.uuid4().hex[:4]}.yaml"
    path.write_text(text)
    return str(path)


def check(result_or_refusal, name: str) -> dict:
    result = getattr(result_or_refusal, "result", result_or_refusal)
    return next(c.to_json() for c in result.checks if c.check == name)


@pytest.mark.slow
def test_thresholds_pass_and_refuse_and_every_decision_leaves_a_report(wine, tmp_path):
    client = MlflowClient()
    strict = write_policy(tmp_path, UNTIMED_LATENCY_YAML + 'thresholds:\n  accuracy: ">= 0.95"\n')

    passed = registry.promote(wine, 2, "Staging", "rf", policy_file=strict)
    with pytest.raises(registry.Refused, match=r"test_accuracy 0\.8889 fails accuracy >= 0\.95"):
        registry.promote(wine, 3, "Staging", "max_iter=1", policy_file=strict)

    assert check(passed, "thresholds")["figures"]["rules"] == {"accuracy >= 0.95": 1.0}
    assert registry.status(wine).staging == "2"
    refused = ledger.entries(client, wine, include_all=True)[-1]
    assert (refused.outcome, refused.version) == ("refused", "3")
    for entry, decision in ((registry.history(wine)[0], "passed"), (refused, "refused")):
        report = mlflow.artifacts.load_dict(f"runs:/{entry.run_id}/gate_report.json")
        assert report["decision"] == decision
        assert report["policy"]["source"] == f"file {strict}"
        assert report["policy"]["thresholds"] == {"accuracy": ">= 0.95"}
        assert [c["check"] for c in report["checks"]] == [
            "loads_and_predicts",
            "thresholds",
            "schema_compatible",
            "latency",
        ]
        page = mlflow.artifacts.load_text(f"runs:/{entry.run_id}/gate_report.md")
        assert f"**{decision.upper()}**" in page
        assert entry.report == f"runs:/{entry.run_id}/gate_report.md"
        version = client.get_model_version(wine, entry.version)
        assert version.tags["stageflow.gate.staging"] == decision
        assert version.tags["stageflow.gate.staging.report"] == entry.report
        assert f"Gate to Staging: {decision}" in version.description
    assert "(thresholds failed)" in client.get_model_version(wine, "3").description


@pytest.mark.slow
def test_a_clearly_worse_challenger_is_refused_and_a_better_one_admitted(wine, tmp_path):
    registry.promote(wine, 2, "Staging")
    registry.promote(wine, 2, "Production")  # no champion yet: thresholds alone decide
    registry.promote(wine, 3, "Staging")

    with pytest.raises(
        registry.Refused, match="beats_champion: accuracy on 36 held-out rows"
    ) as no:
        registry.promote(wine, 3, "Production")
    figures = check(no.value, "beats_champion")["figures"]
    assert (figures["champion"], figures["challenger"]) == ("2", "3")
    assert figures["champion_score"] == 1.0
    assert figures["challenger_score"] == pytest.approx(0.888889, abs=1e-5)
    assert figures["ci_low"] < -figures["allowed_degradation"]
    assert figures["resamples"] == 1000
    assert registry.status(wine).production == "2"

    # The other way round, asking for a confident improvement: v2 over v3.
    registry.rollback(wine, to=3, reason="set up: v3 as champion")
    registry.promote(wine, 2, "Staging")
    better = registry.promote(
        wine,
        2,
        "Production",
        policy_file=write_policy(tmp_path, "comparison:\n  require_improvement: true\n"),
    )
    figures = check(better, "beats_champion")["figures"]
    assert figures["ci_low"] > 0
    assert figures["rule"].startswith("better with confidence")
    assert registry.status(wine).production == "2"


@pytest.mark.slow
def test_a_renamed_input_column_is_refused_unless_allowed_with_a_reason(wine):
    registry.promote(wine, 1, "Staging")
    registry.promote(wine, 1, "Production")

    with pytest.raises(registry.Refused, match="drops column 'alcohol'") as no:
        registry.promote(wine, 4, "Staging")
    assert "requires new column 'alcohol_pct'" in str(no.value)

    allowed = registry.promote(wine, 4, "Staging", allow_breaking="clients send alcohol_pct now")
    schema = check(allowed, "schema_compatible")
    assert schema["passed"]
    assert schema["figures"]["allowed_because"] == "clients send alcohol_pct now"
    assert allowed.report["allow_breaking"] == "clients send alcohol_pct now"


@pytest.mark.slow
def test_a_version_over_the_latency_budget_is_refused_with_its_figures(wine, tmp_path):
    tight = write_policy(tmp_path, "latency:\n  single_row_p95_ms: 0.001\n  repeats: 5\n")
    with pytest.raises(registry.Refused, match=r"latency: single row p95 [\d.]+ ms > budget"):
        registry.promote(wine, 1, "Staging", policy_file=tight)
    loose = write_policy(tmp_path, "latency:\n  single_row_p95_ms: 60000\n  batch_p95_ms: 600000\n")
    figures = check(registry.promote(wine, 1, "Staging", policy_file=loose), "latency")["figures"]
    assert figures["budget"] == {"single_row_p95_ms": 60000.0, "batch_p95_ms": 600000.0}
    assert figures["batch_rows"] == 1000
    assert 0 < figures["single_row_median_ms"] <= figures["single_row_p95_ms"]


@pytest.mark.slow
def test_a_dry_run_runs_the_gates_and_changes_nothing(wine, tmp_path):
    client = MlflowClient()
    before = client.get_model_version(wine, "1")
    result = registry.promote(wine, 1, "Staging", dry_run=True)
    assert result.dry_run
    assert not result.changed
    assert all(c.passed for c in result.checks)
    with pytest.raises(registry.Refused, match="dry run: would refuse"):
        registry.promote(
            wine, 3, "Staging", dry_run=True,
            policy_file=write_policy(
                tmp_path, UNTIMED_LATENCY_YAML + 'thresholds:\n  accuracy: ">= 0.99"\n'
            ),
        )  # fmt: skip
    after = client.get_model_version(wine, "1")
    assert (after.current_stage, after.tags, after.description) == (
        before.current_stage,
        before.tags,
        before.description,
    )
    assert ledger.entries(client, wine, include_all=True) == []
    assert registry.status(wine).staging is None


@pytest.mark.slow
def test_the_cli_prints_the_failed_check_with_its_numbers_and_stores_policies(
    wine, tracking_uri, tmp_path, capsys
):
    def cli(*args):  # main() in this interpreter: the command's output is the subject
        return in_process(capsys, *args, env={"MLFLOW_TRACKING_URI": tracking_uri})

    bad = write_policy(tmp_path, "latency:\n  p99: 3\n")
    refused = cli("policy", "set", "--model", wine, "--file", bad)
    assert refused.returncode == 2
    assert "unknown key latency.p99" in refused.stderr

    good = write_policy(tmp_path, UNTIMED_LATENCY_YAML + 'thresholds:\n  accuracy: ">= 0.95"\n')
    assert cli("policy", "set", "--model", wine, "--file", good).returncode == 0
    shown = json.loads(cli("policy", "show", "--model", wine, "--json").stdout)
    assert shown["source"] == "model tag stageflow.policy"
    assert shown["thresholds"] == {"accuracy": ">= 0.95"}

    no = cli("promote", "--model", wine, "--version", "3", "--to", "Staging")
    assert no.returncode == 1
    errors = [line for line in no.stderr.splitlines() if line.startswith("stageflow")]
    assert len(errors) == 1
    assert "thresholds: test_accuracy 0.8889 fails accuracy >= 0.95" in errors[0]
    assert registry.status(wine).staging is None
