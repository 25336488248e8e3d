"""Live performance: the version's answers against the labels that arrived, with a bootstrap CI.

The primary metric (accuracy, or RMSE) gets a percentile bootstrap interval
(``scipy.stats.bootstrap``) and is compared with the version's own test metric: it
raises an alarm when the whole interval is worse than the test value by more than
the policy's relative ``margin`` -- worse with confidence, not by the luck of a
small window. The other metrics that are a mean over rows (log loss, MAE) get an
interval the same way; F1 and R² are reported as point values.

Log loss needs the class probabilities, and the inference log holds only the
answered labels. The monitor re-scores the labelled rows instead (:func:`rescore`):
it loads the version once and runs its own pipeline's ``predict_proba`` on the
logged inputs of those rows only, in batches. That costs one model load and one
pass over the labelled rows per monitoring window, off the request path; logging
probabilities with every request would put a row of floats per class into every
answer's log for the few rows that ever get a label.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
PRIMARY = {CLASSIFICATION: ("accuracy", True), "regression": ("rmse", False)}
LOG_LOSS = "log_loss"
# Rows per predict_proba call when re-scoring labelled rows: bounded memory, few calls.
RESCORE_BATCH = 50_000
# Bootstrap cells (resamples × rows) held at once, so many labels keep memory flat.
_BOOTSTRAP_CELLS = 2_000_000


@dataclass
class LiveMetrics:
    """The contract's ``live_metrics`` object, plus the other metrics of the task."""

    metric: str
    value: float
    low: float
    high: float
    test_value: float | None
    rows: int
    higher_is_better: bool = True
    others: dict[str, float] = field(default_factory=dict)
    # Bootstrap intervals of the other metrics that are means over rows: {name: [low, high]}.
    intervals: dict[str, list[float]] = field(default_factory=dict)
    # The version's own test value of each other metric, where its run logged one.
    test_others: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The contract's ``live_metrics`` object: the primary metric, then the others."""
        return {k: v for k, v in asdict(self).items() if k != "higher_is_better"}

    def primary(self) -> dict:
        """The primary metric's figures only (what an alarm quotes)."""
        keys = ("metric", "value", "low", "high", "test_value", "rows")
        return {k: getattr(self, k) for k in keys}

    def bound(self, margin: float) -> float | None:
        """The worst value the margin allows around the test metric."""
        if self.test_value is None:
            return None
        if self.higher_is_better:
            return self.test_value * (1 - margin)
        return self.test_value * (1 + margin)

    def outside(self, margin: float) -> bool:
        """Whether the whole interval is worse than the margin allows."""
        bound = self.bound(margin)
        if bound is None:
            return False
        return self.high < bound if self.higher_is_better else self.low > bound


def live_metrics(
    task: str,
    predicted: np.ndarray,
    truth: np.ndarray,
    test_value: float | None,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    *,
    probabilities: np.ndarray | None = None,
    classes=None,
    test_metrics: dict[str, float] | None = None,
) -> LiveMetrics:
    """The task's metrics on labelled rows; bootstrap CIs for those that are means over rows.

    Args:
        predicted: the version's answers (class labels as text, or values).
        truth: the labels, aligned with ``predicted``.
        test_value: the version's own test metric (``test_<metric>`` of its run).
        probabilities: classification: the version's class probabilities for the same
            rows (:func:`rescore`), columns in the order of ``classes``; gives log loss.
        classes: the classes the probabilities' columns stand for.
        test_metrics: the version's run metrics, for the other metrics' test values.
    """
    metric, higher = PRIMARY[task]
    per_row_others: dict[str, np.ndarray] = {}
    if task == CLASSIFICATION:
        predicted = np.asarray(predicted).astype(str)
        truth = np.asarray(truth).astype(str)
        per_row = (predicted == truth).astype(float)
        value = float(per_row.mean())
        labels = sorted(set(truth) | set(predicted))
        binary = len(labels) == 2
        options = {"average": "binary", "pos_label": labels[-1]} if binary else {"average": "macro"}
        others = {"f1": float(metrics.f1_score(truth, predicted, **options))}
        if probabilities is not None and classes is not None:
            per_row_others[LOG_LOSS] = log_losses(truth, probabilities, classes)

        def statistic(a, axis=-1):
            return a.mean(axis=axis)
    else:
        predicted = np.asarray(predicted, dtype=float)
        truth = np.asarray(truth, dtype=float)
        per_row = (predicted - truth) ** 2
        value = float(np.sqrt(per_row.mean()))
        per_row_others["mae"] = np.abs(predicted - truth)
        others = {
            "r2": float(metrics.r2_score(truth, predicted)) if len(truth) > 1 else float("nan"),
        }

        def statistic(a, axis=-1):
            return np.sqrt(a.mean(axis=axis))

    def bootstrap(values: np.ndarray, aggregate) -> tuple[float, float]:
        return _interval(values, aggregate, confidence, resamples, seed)

    low, high = bootstrap(per_row, statistic)
    intervals = {}
    for name, values in per_row_others.items():
        others[name] = float(values.mean())
        intervals[name] = [round(bound, 6) for bound in bootstrap(values, _mean)]
    test_metrics = test_metrics or {}
    return LiveMetrics(
        metric=metric,
        value=round(value, 6),
        low=round(low, 6),
        high=round(high, 6),
        test_value=None if test_value is None else round(float(test_value), 6),
        rows=int(len(per_row)),
        higher_is_better=higher,
        others={k: round(v, 6) for k, v in sorted(others.items())},
        intervals=dict(sorted(intervals.items())),
        test_others={
            k: round(float(test_metrics[f"test_{k}"]), 6)
            for k in sorted(others)
            if f"test_{k}" in test_metrics
        },
    )


def log_losses(truth, probabilities: np.ndarray, classes) -> np.ndarray:
    """Each row's log loss, ``-ln p(true class)``, clipped as scikit-learn's ``log_loss`` clips.

    Their mean is ``sklearn.metrics.log_loss``. A label the model has no class for
    gets the clipped floor (the largest loss), so it counts against the version
    instead of failing the monitor.
    """
    proba = np.asarray(probabilities, dtype=float)
    if proba.ndim == 1:
        proba = np.column_stack([1.0 - proba, proba])
    index = {str(c): i for i, c in enumerate(classes)}
    column = np.array([index.get(str(t), -1) for t in np.asarray(truth)], dtype=int)
    eps = np.finfo(proba.dtype).eps
    chosen = np.where(column >= 0, proba[np.arange(len(proba)), np.maximum(column, 0)], 0.0)
    return -np.log(np.clip(chosen, eps, 1 - eps))


def _mean(a, axis=-1):
    return a.mean(axis=axis)


def _interval(
    per_row: np.ndarray, statistic, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic`` over the rows (the point if constant)."""
    value = float(statistic(per_row))
    if len(per_row) < 2 or not np.ptp(per_row) > 0:
        return value, value
    ci = stats.bootstrap(
        (per_row,),
        statistic,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=max(1, _BOOTSTRAP_CELLS // len(per_row)),
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def rescore(
    client, model: str, version: str, inputs: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """The version's class probabilities for logged rows: ``(probabilities, classes)``.

    Loads the version once, from its verified local copy (``stageflow.manifest``),
    and runs its pipeline's ``predict_proba`` on ``inputs`` (the log's
    ``input.<column>`` values of the labelled rows) in batches of
    :data:`RESCORE_BATCH` rows: the answers' probabilities without logging them
    with every request (see the module docstring).

    Raises:
        ValueError: the version is not a Stageflow classifier (no guarded pipeline),
            or its pipeline cannot score the logged rows (say why, in one line).
        TamperedVersion: the version's files differ from its manifest.
    """
    import mlflow  # noqa: PLC0415 - the statistics stay importable without MLflow's cost
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    from stageflow import manifest  # noqa: PLC0415

    # Not load_model("models:/…"): that loads files nobody verified, from a download
    # into a temporary folder MLflow never removes (one per monitor run).
    pyfunc = mlflow.pyfunc.load_model(str(manifest.local_copy(model, version, client, seal=False)))
    try:
        guarded = pyfunc.unwrap_python_model()
    except MlflowException:
        guarded = None
    contract = getattr(guarded, "contract", None)
    if contract is None or not hasattr(guarded, "predict_pipeline"):
        raise ValueError("the version has no Stageflow pipeline to take probabilities from")
    frame = model_inputs(contract, inputs)
    parts = [
        np.asarray(guarded.predict_pipeline(frame.iloc[start : start + RESCORE_BATCH]))
        for start in range(0, len(frame), RESCORE_BATCH)
    ]
    classes = np.asarray(guarded.estimator.classes_)
    return (np.concatenate(parts) if parts else np.empty((0, len(classes)))), classes


def model_inputs(contract: dict, logged: pd.DataFrame) -> pd.DataFrame:
    """The logged ``input.<column>`` values as the rows the pipeline was trained on.

    Numbers as floats; categories back to the contract's own values (the log keeps
    them as text), unknown ones as they are; dates parsed from their ISO text.
    """
    from monitoring.read import INPUT_PREFIX  # noqa: PLC0415 - monitoring.read imports serving

    columns = {}
    for spec in contract["columns"]:
        name, kind = spec["name"], spec.get("kind")
        values = logged.get(INPUT_PREFIX + name)
        if values is None:
            values = pd.Series(np.nan, index=logged.index)
        if kind == "numeric":
            columns[name] = pd.to_numeric(values, errors="coerce").astype(float)
        elif kind == "datetime":
            columns[name] = pd.to_datetime(values, errors="coerce")
        else:
            known = {str(c): c for c in spec.get("categories", ())}
            text = values.astype(object)
            columns[name] = text.map(
                lambda v, known=known: np.nan if pd.isna(v) else known.get(v, v)
            )
    return pd.DataFrame(columns, index=logged.index)
