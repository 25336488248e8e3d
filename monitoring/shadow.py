"""Champion vs challenger on live data: Production and its shadow on the same labelled rows.

Under ``stageflow serve --shadow`` every request Production answers (and logs) is sent
again to the warm Staging version, whose rows land in its own inference log as
``source=shadow`` with the same request id and row index (``serving/_mirror.py``).
Here the two meet: the shadow's answered rows are joined to the labels that arrived
(``stageflow feedback``), then to Production's answers on (``request_id``, ``row``), so
both versions are judged on exactly the same live rows — the lecture's "don't rely on
offline evaluation". :func:`pairs` gathers those rows (memory bounded by the labels,
Production's log read batch by batch); :func:`summarise` gives the monitor's figures
(both scores, the paired bootstrap interval of the shadow's improvement, how often the
two agree); the gate to Production (``registry.gates.beats_champion``) judges the same
pairs by its own rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from monitoring import labels, read
from monitoring.performance import CLASSIFICATION, PRIMARY
from monitoring.window import Window
from registry import paired_bootstrap
from serving import inference_log

SHADOW = inference_log.SHADOW
KEY = [labels.REQUEST_ID, labels.ROW]
REFUSED = inference_log.REFUSED
# Labelled pairs kept at most (a uniform sample beyond), as for the live metric.
MAX_PAIRS = 200_000


@dataclass
class Pairs:
    """The labelled live rows both versions answered: truth and each one's prediction."""

    production: str
    shadow: str
    task: str
    truth: np.ndarray
    production_predicted: np.ndarray
    shadow_predicted: np.ndarray
    shadow_rows: int = 0  # the shadow's answered rows in the window, labelled or not

    @property
    def rows(self) -> int:
        return len(self.truth)

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row scores (1/0 correct, or the squared error): (shadow, production)."""
        if self.task == CLASSIFICATION:
            truth = self.truth.astype(str)
            return (
                (self.shadow_predicted.astype(str) == truth).astype(float),
                (self.production_predicted.astype(str) == truth).astype(float),
            )
        truth = self.truth.astype(float)
        return (
            (self.shadow_predicted.astype(float) - truth) ** 2,
            (self.production_predicted.astype(float) - truth) ** 2,
        )


@dataclass
class ShadowComparison:
    """The monitor's ``shadow`` block: Production and the shadow on the same live rows."""

    production: str
    shadow: str
    metric: str
    higher_is_better: bool
    rows: int
    shadow_rows: int
    production_value: float | None = None
    shadow_value: float | None = None
    improvement: float | None = None
    low: float | None = None
    high: float | None = None
    agreement: float | None = None
    note: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def pairs(
    client,
    model: str,
    production: str,
    shadow: str,
    window: Window | None,
    task: str,
    known_labels: dict | None = None,
) -> Pairs:
    """The labelled rows of ``window`` that ``production`` answered and ``shadow`` shadowed.

    Args:
        known_labels: :func:`monitoring.labels.load_labels`' answer (read here if None).
    """
    known = labels.load_labels(client, model) if known_labels is None else known_labels
    runs = read.log_runs(client, model, [production, shadow])
    empty = Pairs(production, shadow, task, *(np.empty(0, dtype=object) for _ in range(3)))
    if production not in runs or shadow not in runs or not known:
        return empty
    label_keys = sorted({k for key in known for k in key})
    wanted = [*KEY, "source", "outcome", "prediction", inference_log.SHADOW_OF, *label_keys]
    shadowed, shadow_rows = [], 0
    for frame in read.iter_version(client, runs[shadow], window, columns=wanted):
        frame = frame[(frame["source"] == SHADOW) & (frame["outcome"] != REFUSED)]
        if inference_log.SHADOW_OF in frame.columns:
            frame = frame[frame[inference_log.SHADOW_OF].astype(object) == production]
        shadow_rows += len(frame)
        found = labels.join(frame, known, [*KEY, "prediction"])
        if len(found):
            shadowed.append(found[[*KEY, "prediction", labels.LABEL]])
    empty.shadow_rows = shadow_rows
    if not shadowed:
        return empty
    by_row = _keyed(pd.concat(shadowed, ignore_index=True)).drop_duplicates(KEY, keep="last")
    matched = []
    for frame in read.iter_version(
        client, runs[production], window, columns=[*KEY, "source", "outcome", "prediction"]
    ):
        frame = frame[(frame["source"] != SHADOW) & (frame["outcome"] != REFUSED)]
        if len(frame):
            served = _keyed(frame[[*KEY, "prediction"]])
            found = served.merge(by_row, on=KEY, how="inner", suffixes=("_production", "_shadow"))
            if len(found):
                matched.append(found)
    if not matched:
        return empty
    joined = pd.concat(matched, ignore_index=True).drop_duplicates(KEY, keep="last")
    if len(joined) > MAX_PAIRS:
        joined = joined.sample(MAX_PAIRS, random_state=0)
    return Pairs(
        production,
        shadow,
        task,
        joined[labels.LABEL].to_numpy(),
        joined["prediction_production"].to_numpy(),
        joined["prediction_shadow"].to_numpy(),
        shadow_rows,
    )


def summarise(
    found: Pairs, min_rows: int, confidence: float = 0.95, resamples: int = 1000
) -> ShadowComparison:
    """Both versions' primary metric on the pairs, and the shadow's improvement with its CI.

    Positive improvement means the shadow is better. Below ``min_rows`` pairs only the
    counts are given, with a note.
    """
    metric, higher = PRIMARY[found.task]
    result = ShadowComparison(
        found.production, found.shadow, metric, higher, found.rows, found.shadow_rows
    )
    if found.rows < max(1, min_rows):
        result.note = f"not enough labelled shadow rows: {found.rows} < min_rows {min_rows}"
        return result
    shadow_scores, production_scores = found.scores()

    def aggregate(values):
        mean = float(np.mean(values))
        return mean if found.task == CLASSIFICATION else float(np.sqrt(mean))

    point = (aggregate(shadow_scores) - aggregate(production_scores)) * (1.0 if higher else -1.0)
    low = high = point
    if np.ptp(shadow_scores - production_scores) > 0:  # else nothing varies to resample
        low, high, point = paired_bootstrap(
            shadow_scores, production_scores, metric, higher, resamples, confidence
        )
    result.production_value = round(float(aggregate(production_scores)), 6)
    result.shadow_value = round(float(aggregate(shadow_scores)), 6)
    result.improvement, result.low, result.high = round(point, 6), round(low, 6), round(high, 6)
    same = found.shadow_predicted.astype(str) == found.production_predicted.astype(str)
    if found.task != CLASSIFICATION:
        same = np.isclose(
            found.shadow_predicted.astype(float), found.production_predicted.astype(float)
        )
    result.agreement = round(float(np.mean(same)), 6)
    return result


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame[labels.REQUEST_ID] = frame[labels.REQUEST_ID].astype(str)
    frame[labels.ROW] = pd.to_numeric(frame[labels.ROW]).astype("int64")
    return frame
