"""Live performance: the version's answers against the labels that arrived, with a bootstrap CI.

The primary metric (accuracy, or RMSE) gets a percentile bootstrap interval
(``scipy.stats.bootstrap``) and is compared with the version's own test metric: it
raises an alarm when the whole interval is worse than the test value by more than
the policy's relative ``margin`` -- worse with confidence, not by the luck of a
small window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats
from sklearn import metrics

CLASSIFICATION = "classification"
PRIMARY = {CLASSIFICATION: ("accuracy", True), "regression": ("rmse", False)}


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

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("higher_is_better", "others")}

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
) -> LiveMetrics:
    """The task's metrics on labelled rows; a bootstrap CI for the primary one.

    Args:
        predicted: the version's answers (class labels as text, or values).
        truth: the labels, aligned with ``predicted``.
        test_value: the version's own test metric (``test_<metric>`` of its run).
    """
    metric, higher = PRIMARY[task]
    if task == CLASSIFICATION:
        predicted = np.asarray(predicted).astype(str)
        truth = np.asarray(truth).astype(str)
        per_row = (predicted == truth).astype(float)
        value = float(per_row.mean())
        classes = sorted(set(truth) | set(predicted))
        binary = len(classes) == 2
        options = (
            {"average": "binary", "pos_label": classes[-1]} if binary else {"average": "macro"}
        )
        others = {"f1": float(metrics.f1_score(truth, predicted, **options))}

        def statistic(a, axis=-1):
            return a.mean(axis=axis)
    else:
        predicted = np.asarray(predicted, dtype=float)
        truth = np.asarray(truth, dtype=float)
        per_row = (predicted - truth) ** 2
        value = float(np.sqrt(per_row.mean()))
        others = {
            "mae": float(metrics.mean_absolute_error(truth, predicted)),
            "r2": float(metrics.r2_score(truth, predicted)) if len(truth) > 1 else float("nan"),
        }

        def statistic(a, axis=-1):
            return np.sqrt(a.mean(axis=axis))

    low, high = value, value
    if len(per_row) > 1 and np.ptp(per_row) > 0:
        ci = stats.bootstrap(
            (per_row,),
            statistic,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            batch=max(1, 2_000_000 // len(per_row)),  # bounded memory on many labels
            random_state=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return LiveMetrics(
        metric=metric,
        value=round(value, 6),
        low=round(low, 6),
        high=round(high, 6),
        test_value=None if test_value is None else round(float(test_value), 6),
        rows=int(len(per_row)),
        higher_is_better=higher,
        others={k: round(v, 6) for k, v in others.items()},
    )
