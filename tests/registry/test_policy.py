"""Policy parsing, in-process: what a policy file may say and the one line a bad one gets."""

import json
import math

import pytest

from registry.policy import (
    DEFAULT_POLICY,
    POLICY_TAG,
    from_tag,
    load_file,
    parse,
    parse_duration,
)
from stageflow.errors import UsageError


def refusal(document) -> str:
    with pytest.raises(UsageError) as raised:
        parse(document, "test")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("policy test: ")
    return message


def test_the_default_policy_holds_every_section_with_the_documented_defaults():
    policy = parse(None, "default")
    assert set(policy.values) == {"thresholds", "latency", "comparison", "monitoring"}
    assert policy.values == DEFAULT_POLICY
    assert policy.latency.single_row_p95_ms == 100.0
    assert policy.comparison["resamples"] == 1000
    assert DEFAULT_POLICY["monitoring"] == {
        "min_rows": 200,
        "drift": {"psi": 0.2, "p_value": 0.01},
        "prediction_drift": {"psi": 0.2},
        "live_metric": {"margin": 0.05, "confidence": 0.95, "resamples": 1000},
        "slo": {"refusal_rate": 0.05, "error_rate": 0.01, "p99_latency_ms": 1000.0, "windows": 3},
        "rollback": {"enabled": True, "cooldown": "1h"},
        "retrain": {"on_drift": True, "min_new_labels": 500},
        "auto_promote": False,
    }


def test_monitoring_overrides_key_by_key_at_every_depth():
    policy = parse({"monitoring": {"drift": {"psi": 0.3}, "rollback": {"cooldown": "1h30m"}}}, "t")
    assert policy.monitoring.drift.psi == 0.3
    assert policy.monitoring.drift.p_value == 0.01
    assert policy.monitoring.rollback.enabled is True
    assert policy.monitoring.rollback.cooldown_seconds == 5400
    assert policy.monitoring.slo.windows == 3
    assert policy.to_json()["monitoring"]["rollback"]["cooldown"] == "1h30m"


def test_thresholds_replace_the_default_rules_as_a_whole():
    policy = parse({"thresholds": {"rmse": "<= 60"}}, "t")
    assert [str(t) for t in policy.thresholds] == ["rmse <= 60"]
    assert parse({"thresholds": {}}, "t").thresholds == []


def test_an_int_is_a_number_but_text_and_booleans_are_not():
    assert parse({"latency": {"single_row_p95_ms": 5}}, "t").latency.single_row_p95_ms == 5.0
    assert "latency.batch_p95_ms must be a number (got '3')" in refusal(
        {"latency": {"batch_p95_ms": "3"}}
    )
    assert "latency.repeats must be a whole number (got True)" in refusal(
        {"latency": {"repeats": True}}
    )
    assert "latency.repeats must be a whole number (got 2.5)" in refusal(
        {"latency": {"repeats": 2.5}}
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_key(value):
    message = refusal({"comparison": {"margin": value}})
    assert "comparison.margin must be a finite number, not NaN or infinity" in message


def test_a_threshold_bound_that_overflows_to_infinity_is_refused():
    assert "is not a rule" in refusal({"thresholds": {"accuracy": ">= 1e999"}})


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"latency": 5}, "latency must be a mapping (got 5)"),
        ({"thresholds": None}, "thresholds must be a mapping"),
        ({"thresholds": {"accuracy": 0.8}}, "threshold accuracy: 0.8 is not a rule"),
        ({"latency": {"batch_rows": 0}}, "latency.batch_rows must be >= 1 (got 0)"),
        ({"latency": {"single_row_p95_ms": -1}}, "latency.single_row_p95_ms must be >= 0"),
        (
            {"monitoring": {"drift": {"x": 1}}},
            "unknown key monitoring.drift.x; valid: psi, p_value",
        ),
        ({"monitoring": {"drift": {"p_value": 1.0}}}, "monitoring.drift.p_value must be in (0, 1)"),
        ({"monitoring": {"slo": {"refusal_rate": 2}}}, "monitoring.slo.refusal_rate must be a"),
        ({"monitoring": {"rollback": {"cooldown": "1 hour"}}}, "is not a duration like"),
        ({"monitoring": {"rollback": {"cooldown": 3600}}}, "cooldown must be text"),
        ({"monitoring": {"auto_promote": "no"}}, "monitoring.auto_promote must be true or false"),
        ({"monitoring": {"min_rows": 0}}, "monitoring.min_rows must be >= 1"),
        ([1, 2], "expected a mapping of sections"),
    ],
)
def test_each_bad_value_gets_one_line_naming_its_key(document, fragment):
    assert fragment in refusal(document)


def test_every_problem_is_named_on_the_one_line():
    message = refusal({"typo": 1, "latency": {"p99": 3, "repeats": 0}})
    assert "unknown section(s) typo; valid: thresholds, latency, comparison, monitoring" in message
    assert "unknown key latency.p99" in message
    assert "latency.repeats must be >= 1" in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("0.5h", 1800)],
)
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1 hour", "-1h", "1y"])
def test_a_bad_duration_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match="is not a duration like"):
        parse_duration(text)


# --- files and the model tag -------------------------------------------------------------


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_refusal(path: str) -> str:
    with pytest.raises(UsageError) as raised:
        load_file(path)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_a_file_policy_names_its_source_and_keeps_the_defaults(tmp_path):
    path = write(tmp_path, "p.yaml", "comparison: {margin: 0.15}\nmonitoring: {min_rows: 50}\n")
    policy = load_file(path)
    assert policy.source == f"file {path}"
    assert policy.comparison.margin == 0.15
    assert policy.monitoring.min_rows == 50
    assert policy.latency == parse({}, "d").latency


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("dup.yaml", "latency:\n  repeats: 3\n  repeats: 5\n"),
        ("dup.json", '{"comparison": {"margin": 0.1, "margin": 0.2}}'),
        ("dup-section.yaml", "latency: {repeats: 3}\nlatency: {batch_rows: 5}\n"),
    ],
)
def test_a_key_given_twice_is_refused_with_where(tmp_path, name, text):
    message = load_refusal(write(tmp_path, name, text))
    assert "is given twice" in message
    assert "line" in message


def test_nan_in_yaml_is_refused(tmp_path):
    message = load_refusal(write(tmp_path, "nan.yaml", "latency:\n  batch_p95_ms: .nan\n"))
    assert "latency.batch_p95_ms must be a finite number" in message


def test_broken_yaml_and_a_missing_file_get_one_line(tmp_path):
    assert "is not valid YAML/JSON" in load_refusal(write(tmp_path, "b.yaml", "latency: [\n"))
    assert "does not exist" in load_refusal(str(tmp_path / "nope.yaml"))


def test_a_stored_tag_without_a_monitoring_section_still_reads():
    stored = {k: v for k, v in DEFAULT_POLICY.items() if k != "monitoring"}
    policy = from_tag(json.dumps(stored), "m")
    assert policy.source == f"model tag {POLICY_TAG}"
    assert policy.monitoring.min_rows == 200
    assert from_tag(None, "m").source == "default"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"latency": {"repeats": 3, "repeats": 4}}', "is given twice"),
        ('{"latency": {"batch_p95_ms": NaN}}', "is not JSON"),
        ("not json", "is not JSON"),
    ],
)
def test_a_bad_tag_is_refused_with_the_command_that_replaces_it(text, fragment):
    with pytest.raises(UsageError) as raised:
        from_tag(text, "m")
    assert fragment in str(raised.value)
    assert "stageflow policy set --model m" in str(raised.value)
