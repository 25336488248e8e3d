"""The monitor's statistics on known distributions (fast: no servers)."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from monitoring import assess, drift, labels, parse_duration, performance, read, reference, watch
from monitoring.performance import live_metrics
from monitoring.window import Window
from stageflow.errors import UsageError

RNG = np.random.default_rng(7)
THRESHOLDS = {"psi_threshold": 0.2, "p_threshold": 0.01, "min_rows": 200}


def _verdict(spec, values, batches=4):
    acc = drift.Accumulator("x", spec)
    for part in np.array_split(np.asarray(values, dtype=object), batches):
        acc.add(part.astype(float) if spec["kind"] == reference.NUMERIC else part)
    return acc.verdict(**THRESHOLDS)


def test_psi_is_zero_for_identical_counts_and_grows_with_the_shift():
    counts = np.array([100, 200, 300, 400])
    assert drift.psi(counts, counts) == pytest.approx(0.0)
    small = drift.psi(counts, np.array([110, 200, 290, 400]))
    large = drift.psi(counts, np.array([400, 300, 200, 100]))
    assert 0 < small < 0.05 < 0.2 < large


def test_psi_of_an_empty_bin_is_finite():
    assert np.isfinite(drift.psi(np.array([0, 10]), np.array([10, 0])))


def test_fresh_numeric_rows_from_the_same_distribution_do_not_drift():
    spec = reference.describe(pd.Series(RNG.normal(0, 1, 5000)))
    result = _verdict(spec, RNG.normal(0, 1, 3000))
    assert not result.drifted
    assert result.psi < 0.2
    assert result.p_value > 0.01


def test_a_shifted_numeric_column_drifts_by_psi_and_ks():
    spec = reference.describe(pd.Series(RNG.normal(0, 1, 5000)))
    result = _verdict(spec, RNG.normal(1.0, 1, 3000))
    assert result.drifted
    assert result.test == "ks"
    assert result.psi > 0.2
    assert result.p_value < 1e-6


def test_a_large_window_with_a_trivial_shift_is_not_drift():
    """At 200,000 rows KS calls a 0.05-sd shift significant; PSI says it does not matter."""
    spec = reference.describe(pd.Series(RNG.normal(0, 1, 5000)))
    result = _verdict(spec, RNG.normal(0.05, 1, 200_000))
    assert result.p_value < 0.01
    assert not result.drifted


def test_a_column_of_few_values_keeps_a_bin_per_value_and_a_tied_cdf():
    values = pd.Series(RNG.choice([0.0, 1.0], size=4000, p=[0.6, 0.4]))
    spec = reference.describe(values)
    assert spec["edges"] == [0.0, 1.0]
    cdf = drift.reference_cdf(spec["quantiles"])
    assert cdf(0.0) == pytest.approx(0.6, abs=0.03)
    assert cdf(1.0) == 1.0
    assert not _verdict(spec, RNG.choice([0.0, 1.0], size=3000, p=[0.6, 0.4])).drifted
    assert _verdict(spec, RNG.choice([0.0, 1.0], size=3000, p=[0.2, 0.8])).drifted


def test_categorical_drift_by_psi_and_chi_square_counts_unseen_categories():
    colours = ["red", "green", "blue"]
    spec = reference.describe(pd.Series(RNG.choice(colours, 5000, p=[0.5, 0.3, 0.2])))
    same = _verdict(spec, RNG.choice(colours, 3000, p=[0.5, 0.3, 0.2]))
    assert not same.drifted
    assert same.test == "chi2"
    moved = _verdict(spec, RNG.choice(colours + ["violet"], 3000, p=[0.1, 0.2, 0.4, 0.3]))
    assert moved.drifted
    assert moved.live_share[moved.bins.index(drift.UNSEEN)] == pytest.approx(0.3, abs=0.05)


def test_missing_values_are_a_bin_of_their_own():
    spec = reference.describe(pd.Series(RNG.normal(0, 1, 5000)))
    live = RNG.normal(0, 1, 3000)
    live[:1500] = np.nan
    result = _verdict(spec, live)
    assert result.missing_rate == pytest.approx(0.5)
    assert result.psi > 0.2


def test_too_few_rows_say_so_instead_of_deciding():
    spec = reference.describe(pd.Series(RNG.normal(0, 1, 5000)))
    result = _verdict(spec, RNG.normal(5, 1, 50), batches=1)
    assert not result.drifted
    assert result.psi is None
    assert "not enough rows" in result.note


def test_the_ks_sample_stays_bounded_and_uniform():
    spec = reference.describe(pd.Series(np.arange(1000.0)))
    acc = drift.Accumulator("x", spec)
    for start in range(0, 200_000, 20_000):
        acc.add(np.arange(start, start + 20_000, dtype=float))
    assert len(acc._sample) == drift.KS_SAMPLE
    assert np.mean(acc._sample) == pytest.approx(100_000, rel=0.02)


def test_reference_describes_training_inputs_and_validation_predictions():
    X = pd.DataFrame({"a": RNG.normal(size=500), "c": RNG.choice(["x", "y"], 500)})
    X.loc[:9, "a"] = np.nan
    ref = reference.build(X, RNG.choice([0, 1], 100), "classification")
    assert ref["columns"]["a"]["kind"] == "numeric"
    assert ref["columns"]["a"]["missing"] == 10
    assert sum(ref["columns"]["a"]["counts"]) == 490
    assert set(ref["columns"]["c"]["frequencies"]) == {"x", "y"}
    assert ref["prediction"]["kind"] == "categorical"
    assert set(ref["prediction"]["frequencies"]) <= {"0", "1"}


def test_live_accuracy_has_an_interval_and_an_alarm_only_when_clearly_worse():
    truth = RNG.choice(["a", "b"], 1000)
    good = np.where(RNG.random(1000) < 0.9, truth, np.where(truth == "a", "b", "a"))
    live = live_metrics("classification", good, truth, test_value=0.9, resamples=500)
    assert live.low <= live.value <= live.high
    assert live.low < 0.9 < live.high + 0.02
    assert not live.outside(0.05)
    bad = np.where(RNG.random(1000) < 0.6, truth, np.where(truth == "a", "b", "a"))
    worse = live_metrics("classification", bad, truth, test_value=0.9, resamples=500)
    assert worse.outside(0.05)
    assert "f1" in worse.others


def test_live_rmse_is_lower_is_better():
    truth = RNG.normal(size=800)
    live = live_metrics("regression", truth + RNG.normal(0, 0.5, 800), truth, 0.5, resamples=500)
    assert live.metric == "rmse"
    assert live.value == pytest.approx(0.5, abs=0.05)
    assert not live.outside(0.2)
    far = live_metrics("regression", truth + RNG.normal(0, 2, 800), truth, 0.5, resamples=500)
    assert far.outside(0.05)
    assert set(far.others) == {"mae", "r2"}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800)]
)
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "15", "m", "-1h", "0s", "1 week"])
def test_a_bad_duration_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--since"):
        parse_duration(text)


def test_segments_that_can_overlap_the_window_are_chosen():
    t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
    names = [
        f"{t0 + timedelta(minutes=m):{read.TIME_FORMAT}}-online-{pid}-{seq}.parquet"
        for seq, (m, pid) in enumerate([(0, 1), (30, 1), (50, 1), (70, 1), (10, 2), (65, 2)])
    ]
    segments = [read.Segment.parse(f"segments/{n}") for n in names]
    window = Window(t0 + timedelta(minutes=40), t0 + timedelta(minutes=68), "28m")
    chosen = {(s.stream, s.start.minute) for s in read.overlapping(segments, window)}
    # stream 1: the one begun before (30) runs on into it, 50 inside; 70 is after it.
    # stream 2: 10 may still run on, 65 inside.
    assert chosen == {("online-1", 30), ("online-1", 50), ("online-2", 10), ("online-2", 5)}


def test_labels_by_id_column_or_by_request_id_and_row():
    frame = pd.DataFrame({"order": [1, 2, 2], "target": ["a", "b", "c"]})
    table, key = labels.normalise(frame, "target", "order")
    assert key == ["id"]
    assert table.to_dict("list") == {"id": ["1", "2"], "label": ["a", "c"]}
    by_request = pd.DataFrame({"request_id": ["r1", "r2"], "label": [1.5, 2.5]})
    table, key = labels.normalise(by_request, "target", None)
    assert key == ["request_id", "row"]
    assert table["row"].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("frame", "id_column", "message"),
    [
        (pd.DataFrame({"order": [1], "y": [1]}), "order", "no target column 'target'"),
        (pd.DataFrame({"order": [1], "target": [1]}), "nope", "no id column 'nope'"),
        (pd.DataFrame({"x": [1], "target": [1]}), None, "--id-column"),
        (pd.DataFrame({"order": [1, 2], "target": [1, None]}), "order", "no id or no label"),
    ],
)
def test_labels_without_ids_or_targets_are_refused_naming_the_fix(frame, id_column, message):
    with pytest.raises(UsageError, match=message):
        labels.normalise(frame, "target", id_column)


def test_live_log_loss_is_scikit_learns_with_an_interval_beside_the_test_value():
    from sklearn.metrics import log_loss

    truth = RNG.choice(["a", "b", "c"], 600)
    proba = RNG.dirichlet([1, 1, 1], 600)
    proba[np.arange(600), (truth == "b") + 2 * (truth == "c")] += 1.0  # mostly right
    proba /= proba.sum(axis=1, keepdims=True)
    predicted = np.array(["a", "b", "c"])[proba.argmax(axis=1)]
    live = live_metrics(
        "classification",
        predicted,
        truth,
        test_value=0.9,
        resamples=500,
        probabilities=proba,
        classes=np.array(["a", "b", "c"]),
        test_metrics={"test_accuracy": 0.9, "test_log_loss": 0.41, "test_f1": 0.88},
    )
    expected = log_loss(truth, proba, labels=["a", "b", "c"])
    assert live.others["log_loss"] == pytest.approx(expected, abs=1e-6)
    low, high = live.intervals["log_loss"]
    assert low < live.others["log_loss"] < high
    assert live.test_others == {"f1": 0.88, "log_loss": 0.41}
    assert live.to_json()["intervals"] == {"log_loss": [low, high]}
    assert set(live.primary()) == {"metric", "value", "low", "high", "test_value", "rows"}


def test_log_loss_of_a_label_the_model_has_no_class_for_is_the_clipped_maximum():
    losses = performance.log_losses(
        np.array(["1", "2", "9"]), np.array([[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]), [1, 2]
    )
    assert losses[:2] == pytest.approx([-np.log(0.2), -np.log(0.5)])
    assert losses[2] == pytest.approx(-np.log(np.finfo(float).eps))


def test_live_metrics_without_probabilities_have_no_log_loss():
    truth = RNG.choice(["a", "b"], 300)
    live = live_metrics("classification", truth, truth, test_value=1.0, resamples=100)
    assert "log_loss" not in live.others
    assert live.intervals == {}


def test_logged_inputs_become_the_rows_the_pipeline_was_trained_on():
    contract = {
        "columns": [
            {"name": "x", "kind": "numeric"},
            {"name": "grade", "kind": "categorical", "categories": [1, 2, 3]},
            {"name": "colour", "kind": "categorical", "categories": ["red", "blue"]},
        ]
    }
    logged = pd.DataFrame(
        {
            "input.x": [1.5, None, 3.0],
            "input.grade": pd.Series(["1", "3", None], dtype="category"),
            "input.colour": ["red", "green", None],
        }
    )
    frame = performance.model_inputs(contract, logged)
    assert list(frame.columns) == ["x", "grade", "colour"]
    assert frame["x"].tolist()[::2] == [1.5, 3.0]
    assert np.isnan(frame["x"][1])
    assert frame["grade"].tolist()[:2] == [1, 3]
    assert frame["colour"].tolist()[:2] == ["red", "green"]  # unknown stays as logged
    assert pd.isna(frame["grade"][2])
    assert pd.isna(frame["colour"][2])


def _labelled_frame(n: int, start: int = 0) -> pd.DataFrame:
    ids = np.arange(start, start + n)
    return pd.DataFrame(
        {
            "outcome": "accepted",
            "id": [f"o{i}" for i in ids],
            "prediction": pd.Series(np.where(ids % 2, "yes", "no"), dtype="category"),
            "input.x": ids.astype(float),
        }
    )


def test_labelled_rows_keep_a_bounded_uniform_sample_with_their_inputs_aligned():
    known = {("id",): pd.DataFrame({"id": [f"o{i}" for i in range(5000)], "label": "yes"})}
    labelled = assess.Gathered(
        {"columns": {}, "prediction": {"kind": "categorical"}, "task": "classification"}, known
    ).labelled
    labelled.limit = 300
    for start in range(0, 5000, 500):
        labelled.add(_labelled_frame(500, start))
    predicted, truth = labelled.pairs()
    inputs = labelled.inputs()
    assert labelled.count == 5000
    assert len(predicted) == len(inputs) == 300
    # Aligned: the prediction was made from the row's own input (odd x → "yes").
    assert (predicted == np.where(inputs["input.x"] % 2, "yes", "no")).all()
    # Uniform over the stream, not the last batches only.
    assert inputs["input.x"].mean() == pytest.approx(2500, rel=0.15)


def test_judge_adds_the_live_log_loss_from_the_rescored_probabilities():
    ref = reference.build(
        pd.DataFrame({"x": RNG.normal(size=300)}), RNG.choice(["no", "yes"], 300), "classification"
    )
    known = {("id",): pd.DataFrame({"id": [f"o{i}" for i in range(400)], "label": "yes"})}
    gathered = assess.Gathered(ref, known)
    gathered.add(_labelled_frame(400).assign(source="online", row=0, problem=None, latency_ms=2.0))
    predicted, _ = gathered.labelled.pairs()
    proba = np.where((predicted == "yes")[:, None], [0.1, 0.9], [0.7, 0.3])
    cfg = watch.settings(None)
    report = assess.judge(
        gathered, "3", "production", cfg, {"test_accuracy": 0.5}, (proba, np.array(["no", "yes"]))
    )
    expected = np.mean(np.where(predicted == "yes", -np.log(0.9), -np.log(0.3)))
    assert report.live.others["log_loss"] == pytest.approx(expected, abs=1e-6)
    assert report.live.value == pytest.approx(0.5)
