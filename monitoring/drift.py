"""Drift of live values against a reference: PSI, plus KS (numeric) or chi-square (categorical).

A column drifts when BOTH its PSI is above the policy's ``psi`` and the test's p-value
is below ``p_value``. The test alone flags differences too small to matter once the
window holds many rows (any p is ~0 at a million rows); PSI alone is noisy on a few
hundred. Live values are accumulated batch by batch into the reference's bins and
category counts, with a bounded uniform sample for the KS test, so memory does not
grow with the number of rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from monitoring.reference import CATEGORICAL, NUMERIC, bin_counts

# A bin with no values at all would make PSI infinite; the usual remedy is a floor on
# each proportion (Evidently uses the same 1e-4).
PSI_FLOOR = 1e-4
# The KS test runs on a uniform sample of at most this many live values per column.
KS_SAMPLE = 50_000
UNSEEN = "(unseen)"
MISSING = "(missing)"


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins.

    Hand-written: scipy has no PSI, and it is a few lines --
    ``sum((a - e) * ln(a / e))`` over the bins' proportions, each floored at
    :data:`PSI_FLOOR`.
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    e = np.maximum(e / max(e.sum(), 1.0), PSI_FLOOR)
    a = np.maximum(a / max(a.sum(), 1.0), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_cdf(quantiles: list[float]):
    """The reference's CDF, linear between its percentiles (ties keep their top probability)."""
    q = np.asarray(quantiles, dtype=float)
    p = np.linspace(0, 1, len(q))
    values, last = np.unique(q[::-1], return_index=True)  # the highest p of each tied value
    probabilities = p[::-1][last]

    def cdf(x):
        return np.interp(x, values, probabilities, left=0.0, right=1.0)

    return cdf


@dataclass
class ColumnDrift:
    """One column's verdict (JSON-ready)."""

    column: str
    kind: str
    rows: int
    psi: float | None = None
    test: str | None = None
    statistic: float | None = None
    p_value: float | None = None
    missing_rate: float | None = None
    reference_missing_rate: float | None = None
    drifted: bool = False
    note: str = ""
    # For the report's plots: the reference's and the window's share per bin.
    bins: list[str] = field(default_factory=list, repr=False)
    reference_share: list[float] = field(default_factory=list, repr=False)
    live_share: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _PLOT_KEYS}


_PLOT_KEYS = ("bins", "reference_share", "live_share")


class Accumulator:
    """Live values of one column, gathered batch by batch against its reference."""

    def __init__(self, name: str, spec: dict, seed: int = 0):
        self.name = name
        self.spec = spec
        self.kind = spec["kind"]
        self.rows = 0
        self.missing = 0
        self._rng = np.random.default_rng(seed)
        if self.kind == NUMERIC:
            self.edges = np.asarray(spec.get("edges", []), dtype=float)
            self.counts = np.zeros(len(self.edges) + 1, dtype=np.int64)
            self._sample = np.empty(0)
            self._keys = np.empty(0)
            self._threshold = 1.0  # the largest key kept, once the sample is full
        else:
            self.frequencies: Counter = Counter()

    def add(self, values) -> None:
        """Add a batch: floats with NaN for missing (numeric), or text (categorical)."""
        if self.kind == NUMERIC:
            x = np.asarray(values, dtype=float)
            present = x[~np.isnan(x)]
            self.rows += len(x)
            self.missing += len(x) - len(present)
            self.counts += bin_counts(self.edges, present)
            self._keep_sample(present)
        elif self.kind == CATEGORICAL:
            series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
            self.rows += len(series)
            counts = series.value_counts(dropna=True)
            self.missing += int(len(series) - counts.sum())
            self.frequencies.update({str(k): int(v) for k, v in counts.items()})
        else:
            self.rows += len(values)

    def _keep_sample(self, present: np.ndarray) -> None:
        """A uniform sample without replacement: keep the values with the smallest random keys."""
        keys = self._rng.random(len(present))
        if len(self._sample) >= KS_SAMPLE:  # only keys below the kept ones can enter
            chosen = keys < self._threshold
            keys, present = keys[chosen], present[chosen]
        if not len(present):
            return
        keys = np.concatenate([self._keys, keys])
        sample = np.concatenate([self._sample, present])
        if len(sample) > KS_SAMPLE:
            keep = np.argpartition(keys, KS_SAMPLE - 1)[:KS_SAMPLE]
            keys, sample = keys[keep], sample[keep]
            self._threshold = float(keys.max())
        self._keys, self._sample = keys, sample

    def verdict(self, psi_threshold: float, p_threshold: float, min_rows: int) -> ColumnDrift:
        """PSI and the test against the reference; drifted only when both say so."""
        ref_missing = self.spec["missing"] / max(self.spec["rows"], 1)
        result = ColumnDrift(
            self.name,
            self.kind,
            self.rows,
            missing_rate=_round(self.missing / self.rows) if self.rows else None,
            reference_missing_rate=_round(ref_missing),
        )
        if self.kind not in (NUMERIC, CATEGORICAL):
            result.note = f"{self.kind} columns are not tested for drift"
            return result
        if self.rows < min_rows:
            result.note = f"not enough rows ({self.rows} < {min_rows})"
            return result
        if self.kind == NUMERIC:
            self._numeric(result)
        else:
            self._categorical(result)
        result.drifted = bool(
            result.psi is not None
            and result.psi > psi_threshold
            and result.p_value is not None
            and result.p_value < p_threshold
        )
        return result

    def _numeric(self, result: ColumnDrift) -> None:
        expected = np.append(np.asarray(self.spec["counts"], dtype=float), self.spec["missing"])
        actual = np.append(self.counts, self.missing).astype(float)
        result.psi = _round(psi(expected, actual))
        result.test = "ks"
        if len(self._sample) and self.spec.get("quantiles"):
            # One-sample KS against the reference's CDF (scipy): the reference keeps
            # percentiles, not training rows.
            # The exact p-value costs ~0.2 s per column at 50,000 values; there the
            # asymptotic distribution is accurate to many digits.
            method = "asymp" if len(self._sample) > 10_000 else "auto"
            ks = stats.kstest(self._sample, reference_cdf(self.spec["quantiles"]), method=method)
            result.statistic, result.p_value = _round(ks.statistic), float(ks.pvalue)
        result.bins = _bin_labels(self.edges) + [MISSING]
        result.reference_share = _shares(expected)
        result.live_share = _shares(actual)

    def _categorical(self, result: ColumnDrift) -> None:
        reference = self.spec.get("frequencies", {})
        categories = list(reference)
        unseen = sum(v for k, v in self.frequencies.items() if k not in reference)
        expected = np.array([reference[c] for c in categories] + [0, self.spec["missing"]], float)
        actual = np.array(
            [self.frequencies.get(c, 0) for c in categories] + [unseen, self.missing], float
        )
        result.psi = _round(psi(expected, actual))
        result.test = "chi2"
        table = np.vstack([expected, actual])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] >= 2:
            # Homogeneity of the two samples' counts (scipy): accounts for the
            # reference being a sample too, and takes categories training never saw.
            chi2 = stats.chi2_contingency(table, correction=False)
            result.statistic, result.p_value = _round(chi2.statistic), float(chi2.pvalue)
        else:  # a single category on both sides: nothing can have moved
            result.statistic, result.p_value = 0.0, 1.0
        result.bins = categories + [UNSEEN, MISSING]
        result.reference_share = _shares(expected)
        result.live_share = _shares(actual)


def _bin_labels(edges: np.ndarray) -> list[str]:
    if not len(edges):
        return ["all"]
    bounds = [f"{e:.4g}" for e in edges]
    return (
        [f"< {bounds[0]}"]
        + [f"[{a}, {b})" for a, b in zip(bounds, bounds[1:], strict=False)]
        + [f">= {bounds[-1]}"]
    )


def _shares(counts: np.ndarray) -> list[float]:
    total = float(np.sum(counts)) or 1.0
    return [float(c) / total for c in counts]


def _round(value: float, digits: int = 6) -> float:
    return round(float(value), digits)
