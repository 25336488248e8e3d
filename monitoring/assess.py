"""``stageflow monitor``: what each served version saw and answered in a window, as MLflow runs.

Per version with rows in the window: traffic (rows, requests, refusal and flag
rates by problem, latency p50/p99), input drift per column and prediction drift
against the version's reference, the live metric from the labels that arrived,
and the alarms the policy's ``monitoring:`` thresholds raise. Each (version,
window) becomes one run in ``stageflow-monitoring`` with the figures as metrics
and a report (Markdown, JSON, plots of the drifted columns) as artifacts.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from monitoring import drift, labels, read, reference, shadow, thresholds
from monitoring.performance import CLASSIFICATION, PRIMARY, LiveMetrics, live_metrics, rescore
from monitoring.shadow import ShadowComparison
from monitoring.window import DEFAULT_SINCE, Window
from stageflow import tracking
from stageflow.errors import UsageError

logger = logging.getLogger(__name__)

MONITOR_KIND = "monitor"
PRODUCTION, STAGING, OTHER = "production", "staging", "other"
ACCEPTED, REFUSED, FLAGGED, ERROR = "accepted", "refused", "flagged", "error"
# Labels kept for the live metric: bounded, so a window with millions of labelled rows
# keeps a uniform sample (the bootstrap interval says how sure the figure is).
MAX_LABELLED = 200_000
_SAMPLE_KEY = "_sample_key"


@dataclass
class VersionReport:
    """One version in one window: the figures, the verdicts, the alarms."""

    version: str
    role: str
    rows: int = 0
    requests: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: dict[str, dict[str, int]] = field(default_factory=dict)
    refusal_rate: float = 0.0
    flag_rate: float = 0.0
    error_rate: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    reference_source: str = ""
    reference_note: str = ""
    columns: list[drift.ColumnDrift] = field(default_factory=list)
    prediction: drift.ColumnDrift | None = None
    live: LiveMetrics | None = None
    labelled_rows: int = 0
    notes: list[str] = field(default_factory=list)
    alarm_details: list[dict] = field(default_factory=list)
    run_id: str | None = None
    task: str = ""

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    @property
    def prediction_drift(self) -> bool:
        return bool(self.prediction and self.prediction.drifted)

    @property
    def alarms(self) -> list[str]:
        return [a["message"] for a in self.alarm_details]

    def to_json(self) -> dict:
        """The contract's per-version object (MONITORING_CONTRACT.md)."""
        return {
            "version": self.version,
            "role": self.role,
            "rows": self.rows,
            "requests": self.requests,
            "drifted_columns": self.drifted_columns,
            "prediction_drift": self.prediction_drift,
            "live_metrics": self.live.to_json() if self.live else None,
            "alarms": self.alarms,
            "alarm_details": self.alarm_details,
            "run_id": self.run_id,
        }

    def details(self) -> dict:
        """Everything, for the report artifact."""
        return {
            **self.to_json(),
            "sources": self.sources,
            "outcomes": self.outcomes,
            "problems": self.problems,
            "refusal_rate": self.refusal_rate,
            "flag_rate": self.flag_rate,
            "error_rate": self.error_rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "reference": {"source": self.reference_source, "note": self.reference_note},
            "columns": [c.to_json() for c in self.columns],
            "prediction": self.prediction.to_json() if self.prediction else None,
            "live_metrics_all": (
                {self.live.metric: self.live.value, **self.live.others} if self.live else None
            ),
            "labelled_rows": self.labelled_rows,
            "notes": self.notes,
        }


@dataclass
class MonitorResult:
    model: str
    since: str
    window: Window
    policy_source: str
    policy: dict
    versions: list[VersionReport]
    # Under `serve --shadow`: Production and the Staging version on the same live rows.
    shadow: ShadowComparison | None = None

    @property
    def alarm(self) -> bool:
        return any(v.alarm_details for v in self.versions)

    def to_json(self) -> dict:
        found = {
            "model": self.model,
            "since": self.since,
            "versions": [v.to_json() for v in self.versions],
        }
        if self.shadow is not None:
            found["shadow"] = self.shadow.to_json()
        return found


def monitor(
    model: str,
    since: str = DEFAULT_SINCE,
    tracking_uri: str | None = None,
    policy=None,
    *,
    now=None,
    log: bool = True,
) -> MonitorResult:
    """Monitor every version of ``model`` that answered in the last ``since``.

    Args:
        model: the registered model.
        since: the window, a duration like ``90s``, ``15m``, ``2h``, ``7d``.
        tracking_uri: the tracking server (default: ``MLFLOW_TRACKING_URI``, then local).
        policy: a ``registry.Policy`` or a policy file (default: the model's policy).
        now: the window's end (default: now, UTC).
        log: record one run per version in ``stageflow-monitoring`` (default True).

    Example:
        >>> result = monitor("churn", since="2h")
        >>> [v.drifted_columns for v in result.versions]

    Raises:
        UsageError: a bad duration, an unknown model, a bad policy.
        TrackingServerUnreachable: the tracking server did not answer.
    """

    window = Window.ending_now(since, now)
    client = tracking.client(tracking_uri)
    roles = _roles(client, model)
    policy_source, cfg = thresholds.resolve(client, model, policy)
    known_labels = labels.load_labels(client, model)
    reports = []
    for version, run_id in sorted(read.log_runs(client, model).items(), key=_version_order):
        report = _monitor_version(
            client, model, version, roles.get(version, OTHER), run_id, window, cfg, known_labels
        )
        if report is None:
            continue
        if log:
            from monitoring import report as reporting  # noqa: PLC0415 - matplotlib on demand

            report.run_id = reporting.log_run(client, model, report, window, policy_source, cfg)
        reports.append(report)
    result = MonitorResult(model, since, window, policy_source, cfg, reports)
    result.shadow = _compare_shadow(client, model, reports, window, cfg, known_labels)
    return result


def _compare_shadow(client, model, reports, window, cfg, known_labels):
    """Production vs the Staging version on the live rows the Staging one shadowed, if any."""
    production = next((r for r in reports if r.role == PRODUCTION), None)
    staging = next((r for r in reports if r.role == STAGING and r.sources.get(shadow.SHADOW)), None)
    if production is None or staging is None or not known_labels:
        return None
    found = shadow.pairs(
        client, model, production.version, staging.version, window, staging.task, known_labels
    )
    return shadow.summarise(
        found,
        int(cfg["min_rows"]),
        confidence=cfg["live_metric"]["confidence"],
        resamples=int(cfg["live_metric"]["resamples"]),
    )


def _roles(client, model: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        versions = client.search_model_versions(f"name = {tracking.filter_value(model)}")
    except MlflowException:
        versions = []
    if not versions:
        raise UsageError(f"model {model!r} has no registered versions; train one first")
    roles = {}
    for v in versions:
        aliases = set(v.aliases or ())
        if v.current_stage == "Production" or "champion" in aliases:
            roles[str(v.version)] = PRODUCTION
        elif v.current_stage == "Staging" or "challenger" in aliases:
            roles[str(v.version)] = STAGING
    return roles


def _version_order(item) -> tuple:
    version = item[0]
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class _Traffic:
    """Counts of one version's rows, requests and outcomes, batch by batch."""

    def __init__(self):
        self.rows = 0
        self.requests = 0
        self.errors = 0
        self.refused_requests = 0
        self.sources: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.problems: dict[str, Counter] = {}
        self.latencies: list[np.ndarray] = []

    def add(self, frame: pd.DataFrame) -> None:
        self.rows += len(frame)
        outcome = frame["outcome"]
        self.sources.update(_counts(frame["source"]))
        self.outcomes.update(_counts(outcome))
        problems = frame.loc[outcome.isin([REFUSED, FLAGGED]), ["outcome", "problem"]]
        for (kind, problem), n in problems.astype(object).fillna("unknown").value_counts().items():
            self.problems.setdefault(str(kind), Counter())[str(problem)] += int(n)
        # A request's first row stands for it; a refused request is logged as one row.
        rows = pd.to_numeric(frame["row"], errors="coerce")
        first = (outcome == REFUSED) | (rows <= 0)
        self.requests += int(first.sum())
        self.refused_requests += int((first & (outcome == REFUSED)).sum())
        self.errors += int((first & (outcome == ERROR)).sum())
        latency = pd.to_numeric(frame.loc[first, "latency_ms"], errors="coerce").to_numpy(float)
        latency = latency[~np.isnan(latency)]
        if len(latency):
            self.latencies.append(latency.astype(np.float32))


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().items() if v}


class Gathered:
    """One version's rows, accumulated batch by batch: traffic, inputs, predictions, labels."""

    def __init__(self, ref: dict, known_labels: dict):
        self.ref = ref
        self.inputs = {
            name: drift.Accumulator(name, spec, seed=i)
            for i, (name, spec) in enumerate(ref["columns"].items())
        }
        self.predicted = drift.Accumulator(reference.PREDICTION, ref[reference.PREDICTION])
        self.traffic = _Traffic()
        # A classifier's labelled rows keep their inputs: the monitor re-scores them for
        # log loss (monitoring.performance.rescore).
        self.labelled = _Labelled(known_labels, keep_inputs=ref.get("task") == CLASSIFICATION)

    def columns(self) -> list[str]:
        """The log columns this needs: traffic and inputs, the ids only when labels exist."""
        keys = [k for key in self.labelled.by_key for k in key]
        return [*read.MONITOR_COLUMNS, read.INPUT_PREFIX + "*", *keys]

    def add(self, frame: pd.DataFrame) -> None:
        self.traffic.add(frame)
        answered = frame[frame["outcome"] != REFUSED]
        if not len(answered):
            return
        for name, acc in self.inputs.items():
            column = read.INPUT_PREFIX + name
            if column in answered.columns:
                acc.add(_values(answered[column], acc.kind))
        self.predicted.add(_values(answered["prediction"], self.predicted.kind))
        self.labelled.add(answered)


def _monitor_version(client, model, version, role, run_id, window, cfg, known_labels):
    started = time.perf_counter()
    ref = reference.load(client, model, version)
    gathered = Gathered(ref, known_labels)
    for frame in read.iter_version(client, run_id, window, columns=gathered.columns()):
        gathered.add(frame)
    logger.info(
        "%s v%s: %d rows in the window read in %.1fs",
        model,
        version,
        gathered.traffic.rows,
        time.perf_counter() - started,
    )
    if gathered.traffic.rows == 0:
        return None
    test_metrics = client.get_run(client.get_model_version(model, version).run_id).data.metrics
    probabilities, note = None, ""
    if gathered.labelled.keep_inputs and gathered.labelled.count >= int(cfg["min_rows"]):
        started = time.perf_counter()
        try:
            probabilities = rescore(client, model, version, gathered.labelled.inputs())
        except Exception as exc:  # noqa: BLE001 - no log loss is a note, never a failed monitor
            note = f"no live log loss: re-scoring the labelled rows failed: {_first_line(exc)}"
            logger.warning("%s v%s: %s", model, version, note)
        else:
            logger.info(
                "%s v%s: re-scored %d labelled rows for log loss in %.1fs",
                model,
                version,
                len(probabilities[0]),
                time.perf_counter() - started,
            )
    report = judge(gathered, version, role, cfg, test_metrics, probabilities)
    if note:
        report.notes.append(note)
    return report


def judge(
    gathered: Gathered,
    version: str,
    role: str,
    cfg: dict,
    test_metrics: dict,
    probabilities: tuple[np.ndarray, np.ndarray] | None = None,
):
    """The verdicts and alarms on what was gathered, by the policy's thresholds.

    Args:
        probabilities: a classifier's ``(class probabilities, classes)`` for the
            labelled rows, in :meth:`_Labelled.pairs` order (``performance.rescore``
            of :meth:`_Labelled.inputs`): adds the live log loss.
    """
    ref = gathered.ref
    task = ref.get("task", "regression")
    report = VersionReport(version=version, role=role, task=task)
    _fill_traffic(report, gathered.traffic)
    report.reference_source = ref.get("source", reference.FROM_TRAINING)
    report.reference_note = ref.get("note", "")
    if report.reference_note:
        report.notes.append(f"reference {report.reference_note}")
    min_rows = int(cfg["min_rows"])
    report.columns = [
        acc.verdict(cfg["drift"]["psi"], cfg["drift"]["p_value"], min_rows)
        for acc in gathered.inputs.values()
    ]
    report.prediction = gathered.predicted.verdict(
        cfg["prediction_drift"]["psi"], cfg["drift"]["p_value"], min_rows
    )
    answered_rows = gathered.predicted.rows
    if answered_rows < min_rows:
        report.notes.append(
            f"not enough rows for drift: {answered_rows} answered rows < min_rows {min_rows}"
        )
    labelled = gathered.labelled
    report.labelled_rows = labelled.count
    if labelled.count >= min_rows:
        metric, _ = PRIMARY[task]
        proba, classes = probabilities if probabilities is not None else (None, None)
        report.live = live_metrics(
            task,
            *labelled.pairs(),
            test_metrics.get(f"test_{metric}"),
            confidence=cfg["live_metric"]["confidence"],
            resamples=int(cfg["live_metric"]["resamples"]),
            probabilities=proba,
            classes=classes,
            test_metrics=test_metrics,
        )
    elif labelled.count:
        report.notes.append(
            f"not enough labelled rows for the live metric: {labelled.count} < {min_rows}"
        )
    report.alarm_details = _alarms(report, cfg, min_rows)
    return report


def _fill_traffic(report: VersionReport, traffic: _Traffic) -> None:
    report.rows = traffic.rows
    report.requests = traffic.requests
    report.sources = dict(traffic.sources)
    report.outcomes = dict(traffic.outcomes)
    report.problems = {k: dict(v) for k, v in traffic.problems.items()}
    requests = max(traffic.requests, 1)
    report.refusal_rate = round(traffic.refused_requests / requests, 6)
    report.error_rate = round(traffic.errors / requests, 6)
    report.flag_rate = round(traffic.outcomes.get(FLAGGED, 0) / max(traffic.rows, 1), 6)
    if traffic.latencies:
        latency = np.concatenate(traffic.latencies)
        report.latency_p50_ms = round(float(np.percentile(latency, 50)), 3)
        report.latency_p99_ms = round(float(np.percentile(latency, 99)), 3)


def _values(series: pd.Series, kind: str):
    if kind == reference.NUMERIC:
        if not pd.api.types.is_numeric_dtype(series):
            series = pd.to_numeric(series, errors="coerce")
        return series.to_numpy(dtype=float, na_value=np.nan)
    return series


class _Labelled:
    """The answered rows that have a label, joined on ``id`` or on (``request_id``, ``row``).

    At most :data:`MAX_LABELLED` are kept, a uniform sample: every joined row draws a
    random key and the rows with the smallest keys stay (compacted as they arrive, so
    memory stays bounded however many labels the window holds).
    """

    def __init__(self, by_key: dict, keep_inputs: bool = False, limit: int = MAX_LABELLED):
        self.by_key = by_key
        self.keep_inputs = keep_inputs
        self.limit = limit
        self.count = 0
        self._parts: list[pd.DataFrame] = []
        self._held = 0
        self._rng = np.random.default_rng(0)
        self._sample: pd.DataFrame | None = None

    def add(self, frame: pd.DataFrame) -> None:
        inputs = (
            [c for c in frame.columns if c.startswith(read.INPUT_PREFIX)]
            if self.keep_inputs
            else []
        )
        for key, table in self.by_key.items():
            key = list(key)
            if not all(k in frame.columns for k in key):
                continue
            left = frame[[*key, "prediction", *inputs]].dropna(subset=key).copy()
            if labels.ID in key:
                left[labels.ID] = left[labels.ID].astype(str)
            else:
                left[labels.REQUEST_ID] = left[labels.REQUEST_ID].astype(str)
                left[labels.ROW] = pd.to_numeric(left[labels.ROW]).astype("int64")
            right = table.copy()
            for k in key:
                right[k] = right[k].astype(left[k].dtype)
            joined = left.merge(right, on=key, how="inner")
            if len(joined):
                self.count += len(joined)
                kept = joined[["prediction", labels.LABEL, *inputs]]
                # Categorical columns of different batches would not concatenate as such.
                kept = kept.astype({c: object for c in kept.columns if kept[c].dtype == "category"})
                kept[_SAMPLE_KEY] = self._rng.random(len(kept))
                self._parts.append(kept)
                self._held += len(kept)
                self._sample = None
                if self._held > 2 * self.limit:
                    self._compact()

    def _compact(self) -> pd.DataFrame:
        held = pd.concat(self._parts, ignore_index=True) if self._parts else pd.DataFrame()
        if len(held) > self.limit:
            keep = np.argpartition(held[_SAMPLE_KEY].to_numpy(), self.limit)[: self.limit]
            held = held.iloc[np.sort(keep)].reset_index(drop=True)
        self._parts, self._held = [held], len(held)
        return held

    def sample(self) -> pd.DataFrame:
        """The kept labelled rows: ``prediction``, ``label`` and (if kept) ``input.*``."""
        if self._sample is None:
            self._sample = self._compact().drop(columns=[_SAMPLE_KEY], errors="ignore")
        return self._sample

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        sample = self.sample()
        return sample["prediction"].to_numpy(), sample[labels.LABEL].to_numpy()

    def inputs(self) -> pd.DataFrame:
        """The logged inputs of the rows :meth:`pairs` returns, in the same order."""
        sample = self.sample()
        return sample[[c for c in sample.columns if c.startswith(read.INPUT_PREFIX)]]


def _alarms(report: VersionReport, cfg: dict, min_rows: int) -> list[dict]:
    alarms = []
    for column in report.columns:
        if column.drifted:
            alarms.append(
                {
                    "kind": "drift",
                    "message": f"input drift in {column.column!r}: PSI {column.psi:.3f} > "
                    f"{cfg['drift']['psi']:g}, {column.test} p {column.p_value:.2g}",
                    "column": column.column,
                    "psi": column.psi,
                    "test": column.test,
                    "p_value": column.p_value,
                }
            )
    if report.prediction_drift:
        p = report.prediction
        alarms.append(
            {
                "kind": "prediction_drift",
                "message": f"prediction drift: PSI {p.psi:.3f} > {cfg['prediction_drift']['psi']:g}"
                f", {p.test} p {p.p_value:.2g}",
                "psi": p.psi,
                "test": p.test,
                "p_value": p.p_value,
            }
        )
    live, margin = report.live, float(cfg["live_metric"]["margin"])
    if live is not None and live.outside(margin):
        alarms.append(
            {
                "kind": "live_metric",
                "message": f"live {live.metric} {live.value:.4g} "
                f"[{live.low:.4g}, {live.high:.4g}] is worse than {live.bound(margin):.4g} "
                f"(test {live.test_value:.4g}, margin {margin:.0%})",
                **live.primary(),
                "bound": live.bound(margin),
                "margin": margin,
            }
        )
    if report.rows >= min_rows:
        slo = cfg["slo"]
        for name, value, limit, text in (
            ("refusal_rate", report.refusal_rate, slo["refusal_rate"], "refusal rate"),
            ("error_rate", report.error_rate, slo["error_rate"], "error rate"),
        ):
            if value > float(limit):
                alarms.append(
                    {
                        "kind": "slo",
                        "slo": name,
                        "message": f"{text} {value:.1%} > {float(limit):.1%}",
                        "value": value,
                        "threshold": float(limit),
                    }
                )
        p99, limit = report.latency_p99_ms, float(slo["p99_latency_ms"])
        if p99 is not None and p99 > limit:
            alarms.append(
                {
                    "kind": "slo",
                    "slo": "p99_latency_ms",
                    "message": f"p99 latency {p99:.0f} ms > {limit:.0f} ms",
                    "value": p99,
                    "threshold": limit,
                }
            )
    return alarms


def project_run_id() -> str | None:
    """The `mlflow run` project run this process runs in, if any."""
    return os.environ.get("MLFLOW_RUN_ID")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
