"""The gates' decisions on given figures, in-process: thresholds, latency, schema, comparison."""

import numpy as np
import pytest

from registry import _compare
from registry.gates import judge_latency, judge_schema, judge_thresholds
from registry.policy import parse


def rules(**given):
    return parse({"thresholds": given}, "test").thresholds


# --- thresholds ------------------------------------------------------------------------


def test_thresholds_pass_when_every_rule_for_the_task_holds():
    result = judge_thresholds(rules(accuracy=">= 0.8"), {"test_accuracy": 0.9}, "classification")
    assert result.passed
    assert result.detail == "met accuracy >= 0.8 (0.9000)"
    assert result.figures["rules"] == {"accuracy >= 0.8": 0.9}


def test_thresholds_fail_naming_the_metric_its_value_and_the_rule():
    result = judge_thresholds(
        rules(accuracy=">= 0.95", f1="> 0.5"),
        {"test_accuracy": 0.8889, "test_f1": 0.9},
        "classification",
    )
    assert not result.passed
    assert result.detail == "test_accuracy 0.8889 fails accuracy >= 0.95"


def test_a_rule_for_the_other_task_is_skipped_not_failed():
    result = judge_thresholds(rules(accuracy=">= 0.99", r2=">= 0"), {"test_r2": 0.4}, "regression")
    assert result.passed
    assert result.figures["skipped_for_other_task"] == ["accuracy >= 0.99"]
    only_other = judge_thresholds(rules(accuracy=">= 0.99"), {}, "regression")
    assert only_other.passed
    assert only_other.detail == "no threshold applies to a regression model"


def test_a_metric_the_run_did_not_log_fails_naming_the_run():
    result = judge_thresholds(rules(rmse="<= 60"), {}, "regression", run_id="abc")
    assert not result.passed
    assert result.detail == "test_rmse is not logged on run abc"


def test_no_rules_pass():
    assert judge_thresholds([], {}, None).detail == "the policy sets no thresholds"


@pytest.mark.parametrize(
    ("rule", "value", "holds"),
    [("> 0.5", 0.5, False), (">= 0.5", 0.5, True), ("< 60", 60, False), ("<= 60", 60, True)],
)
def test_the_operators_are_strict_or_not_as_written(rule, value, holds):
    assert judge_thresholds(rules(rmse=rule), {"test_rmse": value}, "regression").passed is holds


# --- latency ---------------------------------------------------------------------------


def budget(**given):
    return parse({"latency": given}, "test").latency


def test_latency_within_budget_passes_with_its_figures():
    result = judge_latency([1.0] * 19 + [2.0], [10.0, 11.0, 12.0], budget())
    assert result.passed
    assert result.figures["single_row_p95_ms"] == 1.05
    assert result.figures["batch_p95_ms"] == 11.9
    assert result.figures["budget"] == {"single_row_p95_ms": 100.0, "batch_p95_ms": 1000.0}
    assert result.figures["calls"] == {"single_row": 20, "batch": 3}


def test_latency_over_either_budget_fails_naming_which():
    single = judge_latency([5.0] * 5, [1.0] * 3, budget(single_row_p95_ms=1))
    assert not single.passed
    assert single.detail == "single row p95 5.00 ms > budget 1 ms"
    batch = judge_latency([0.5] * 5, [900.0] * 3, budget(batch_p95_ms=100, batch_rows=50))
    assert not batch.passed
    assert batch.detail == "50 rows p95 900.00 ms > budget 100 ms"


# --- schema ----------------------------------------------------------------------------

OLD = {"alcohol": ("double", True), "colour": ("string", True), "age": ("integer", False)}


def test_the_same_or_a_widened_schema_is_compatible():
    assert judge_schema(OLD, OLD, "1").passed
    widened = {**OLD, "age": ("double", False), "note": ("string", False)}
    result = judge_schema(OLD, widened, "1")
    assert result.passed
    assert result.figures["breaking"] == []


def test_dropped_retyped_and_new_required_columns_break_clients():
    new = {"alcohol": ("string", True), "age": ("integer", False), "extra": ("double", True)}
    result = judge_schema(OLD, new, "1")
    assert not result.passed
    assert result.figures["breaking"] == [
        "retypes 'alcohol' double → string",
        "drops column 'colour'",
        "requires new column 'extra' (double)",
    ]
    assert result.detail.endswith("pass --allow-breaking REASON to accept")


def test_a_column_the_challenger_now_ignores_is_not_dropped_for_its_clients():
    # Retrained, the data check found 'colour' constant: the challenger's contract lists it
    # in ignored_columns, so a client that sends it is still answered (the guard drops it).
    new = {"alcohol": ("double", True), "age": ("integer", False)}
    result = judge_schema(OLD, new, "1", ignored=frozenset({"colour"}))
    assert result.passed, result.detail
    assert result.figures["breaking"] == []
    assert result.figures["now_ignored"] == ["colour"]
    assert "now ignores 'colour'" in result.detail
    # Ignoring another column does not excuse dropping this one.
    still = judge_schema(OLD, new, "1", ignored=frozenset({"age"}))
    assert still.figures["breaking"] == ["drops column 'colour'"]


def test_a_breaking_change_passes_only_with_a_reason_that_goes_into_the_figures():
    result = judge_schema(OLD, {"alcohol": ("double", True)}, "1", allow_breaking="new feed")
    assert result.passed
    assert result.figures["allowed_because"] == "new feed"
    assert "(allowed: new feed)" in result.detail


# --- the comparison's rule -------------------------------------------------------------


def decide(low, high, point, champion_score=0.9, **policy):
    return _compare.decide(
        metric="accuracy",
        higher_is_better=True,
        champion="1",
        challenger="2",
        rows=100,
        champion_score=champion_score,
        challenger_score=champion_score + point,
        interval=(low, high, point),
        policy=parse({"comparison": policy}, "test").comparison,
    )


def test_non_inferiority_allows_the_margin_of_the_champions_score():
    # margin 0.02 of 0.9 allows a lower bound down to -0.018.
    assert decide(-0.017, 0.01, 0.0).passed
    refused = decide(-0.019, 0.01, 0.0)
    assert not refused.passed
    assert refused.figures["allowed_degradation"] == 0.018
    assert "fails non-inferior: CI lower bound ≥ -0.018" in refused.detail


def test_requiring_improvement_needs_a_lower_bound_above_zero():
    assert not decide(0.0, 0.05, 0.02, require_improvement=True).passed
    passed = decide(0.001, 0.05, 0.02, require_improvement=True)
    assert passed.passed
    assert passed.figures["rule"] == "better with confidence: CI lower bound > 0"


def test_the_margin_scales_with_the_magnitude_of_a_negative_or_lower_is_better_score():
    # RMSE 50: 2% is 1.0 of RMSE, whatever the sign convention of the score.
    assert decide(-0.99, 0.5, 0.0, champion_score=50.0).passed
    assert not decide(-1.01, 0.5, 0.0, champion_score=50.0).passed


# --- the bootstrap: scipy.stats.bootstrap against the hand-written one it replaced -------


def hand_written_bootstrap(challenger, champion, metric, higher_is_better, resamples, confidence):
    """The interval Stageflow computed by hand before scipy (kept here as the reference)."""
    aggregate = (
        (lambda a: np.sqrt(a.mean(axis=-1))) if metric == "rmse" else (lambda a: a.mean(axis=-1))
    )
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(0)
    n = len(challenger)
    diffs = []
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        diffs.append(sign * (aggregate(challenger[idx]) - aggregate(champion[idx])))
    diffs = np.concatenate(diffs)
    tail = (1 - confidence) / 2 * 100
    point = sign * (aggregate(challenger) - aggregate(champion))
    return float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail)), float(point)


def fixed_figures():
    rng = np.random.default_rng(7)
    champion_correct = (rng.random(300) < 0.8).astype(float)
    challenger_correct = np.where(rng.random(300) < 0.1, 1 - champion_correct, champion_correct)
    errors = rng.gamma(2.0, 10.0, 2500)
    return {
        "accuracy": (challenger_correct, champion_correct, "accuracy", True),
        # 2500 rows: the resamples come in batches (bounded memory), as on large splits.
        "rmse": (errors * rng.uniform(0.9, 1.08, 2500), errors, "rmse", False),
    }


@pytest.mark.parametrize("case", ["accuracy", "rmse"])
@pytest.mark.parametrize(("resamples", "confidence"), [(1000, 0.95), (2000, 0.9)])
def test_scipy_bootstrap_gives_the_hand_written_interval_and_decision(case, resamples, confidence):
    challenger, champion, metric, higher = fixed_figures()[case]
    ours = _compare.paired_bootstrap(challenger, champion, metric, higher, resamples, confidence)
    reference = hand_written_bootstrap(challenger, champion, metric, higher, resamples, confidence)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)
    for margin in (0.0, 0.02, 0.1):
        for improve in (False, True):
            policy = {"margin": margin, "require_improvement": improve, "resamples": resamples}
            score = float(np.sqrt(champion.mean())) if metric == "rmse" else champion.mean()
            assert (
                decide(*ours, champion_score=score, **policy).passed
                is decide(*reference, champion_score=score, **policy).passed
            )


def test_the_same_figures_give_the_same_interval():
    challenger, champion, metric, higher = fixed_figures()["accuracy"]
    first = _compare.paired_bootstrap(challenger, champion, metric, higher, 500, 0.95)
    assert _compare.paired_bootstrap(challenger, champion, metric, higher, 500, 0.95) == first
