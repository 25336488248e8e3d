"""Gates: the checks a version must pass before it enters a stage, judged by a policy.

A gate is a list of checks; each takes the :class:`GateContext` and returns a
:class:`CheckResult` saying what it measured (``figures``) and whether that
passed. The numbers it judges by come from the policy (``registry.policy``), never
from the code. Adding a check means writing one function and listing it in :data:`GATES`.
Each check gathers its figures (loads models, reads the run, times predictions) and
hands them to a ``judge_*`` function that only decides, so the decisions are tested on
given figures without a server; the champion comparison lives in ``registry._compare``.

- Staging: loads and predicts its input example; absolute thresholds on its test
  metrics; input schema compatible with the current Production version; latency
  within budget.
- Production: comes from Staging; loads and predicts; thresholds; schema; and the
  champion-vs-challenger comparison on the challenger's held-out test split.
- Rollback: loads and predicts, nothing else (it is the emergency exit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from registry import _compare
from registry._stages import PRODUCTION, STAGING, current_version
from registry.policy import TASK_METRICS, LatencyBudget, Policy, Threshold
from stageflow import manifest
from stageflow.contract import ignored_columns, input_columns

logger = logging.getLogger(__name__)

TASK_TAG = "stageflow.task"
# Type changes a client's existing payloads survive.
WIDENING = {
    ("integer", "long"),
    ("integer", "float"),
    ("integer", "double"),
    ("long", "double"),
    ("float", "double"),
}


@dataclass
class GateContext:
    client: MlflowClient
    model: str
    version: ModelVersion
    to_stage: str
    policy: Policy
    allow_breaking: str = ""  # the reason a breaking schema change is accepted, if it is
    evaluation_parent: str = ""  # ledger run the comparison's evaluation run hangs under
    seal: bool = True  # record a manifest for a version without one (not in a dry run)
    _models: dict = field(default_factory=dict, repr=False)

    def load(self, version: str):
        """The pyfunc model of ``version``, loaded once per gate run."""
        if version not in self._models:
            # Loaded from a copy verified against the version's manifest, fetched afresh:
            # files changed in the store refuse the gate (stageflow.manifest).
            path = manifest.local_copy(self.model, version, self.client, fresh=True, seal=self.seal)
            self._models[version] = mlflow.pyfunc.load_model(str(path))
        return self._models[version]

    def champion(self) -> str | None:
        """The current Production version, unless it is the version being judged."""
        current = current_version(self.client, self.model, PRODUCTION)
        return current if current != str(self.version.version) else None

    def task(self) -> str | None:
        tags = self.version.tags or {}
        if tags.get(TASK_TAG):
            return tags[TASK_TAG]
        run = self.run()
        return run.data.tags.get(TASK_TAG) if run else None

    def run(self):
        if "run" not in self._models:
            run_id = self.version.run_id
            self._models["run"] = self.client.get_run(run_id) if run_id else None
        return self._models["run"]


@dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    detail: str
    figures: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


Check = Callable[[GateContext], CheckResult]


def from_staging(ctx: GateContext) -> CheckResult:
    """Production is entered only from Staging."""
    stage = ctx.version.current_stage
    return CheckResult(
        "from_staging",
        stage == STAGING,
        f"version {ctx.version.version} is in {stage}"
        + ("" if stage == STAGING else "; promote it to Staging first"),
    )


def loads_and_predicts(ctx: GateContext) -> CheckResult:
    """The version loads through pyfunc and predicts its own input example."""
    name = "loads_and_predicts"
    uri = f"models:/{ctx.model}/{ctx.version.version}"
    started = time.perf_counter()
    try:
        model = ctx.load(str(ctx.version.version))
    except Exception as exc:  # noqa: BLE001 - any load failure is the verdict
        return CheckResult(name, False, f"{uri} does not load: {_first_line(exc)}")
    load_s = time.perf_counter() - started
    example = model.input_example
    if example is None:
        return CheckResult(name, False, f"{uri} has no input example to predict")
    started = time.perf_counter()
    try:
        predictions = model.predict(example)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, False, f"{uri} fails on its input example: {_first_line(exc)}")
    predict_ms = (time.perf_counter() - started) * 1000
    rows = len(example)
    frame = pd.DataFrame(predictions)
    if len(frame) != rows:
        return CheckResult(name, False, f"{uri} returned {len(frame)} predictions for {rows} rows")
    numbers = frame.select_dtypes("number").to_numpy(dtype=float)
    if not np.isfinite(numbers).all():
        return CheckResult(name, False, f"{uri} predicted NaN or infinity on its input example")
    figures = {"load_seconds": round(load_s, 3), "predict_ms": round(predict_ms, 2), "rows": rows}
    return CheckResult(
        name,
        True,
        f"loaded in {load_s:.1f}s, predicted {rows} rows in {predict_ms:.0f} ms",
        figures,
    )


def thresholds(ctx: GateContext) -> CheckResult:
    """The version's logged test metrics meet the policy's absolute rules."""
    rules = ctx.policy.thresholds
    if not rules:
        return judge_thresholds(rules, {}, None)
    run = ctx.run()
    if run is None:
        return CheckResult(
            "thresholds", False, f"version {ctx.version.version} has no training run"
        )
    return judge_thresholds(rules, run.data.metrics, ctx.task(), run.info.run_id)


def judge_thresholds(
    rules: Sequence[Threshold],
    metrics: Mapping[str, float],
    task: str | None,
    run_id: str = "",
) -> CheckResult:
    """The thresholds verdict on given figures.

    Args:
        rules: the policy's rules.
        metrics: the training run's logged metrics (``test_<metric>`` is judged).
        task: the version's task; rules for the other task's metrics are skipped.
        run_id: the training run, named when a metric is missing.
    """
    name = "thresholds"
    if not rules:
        return CheckResult(name, True, "the policy sets no thresholds")
    applicable = [r for r in rules if task is None or r.metric in TASK_METRICS.get(task, ())]
    skipped = [str(r) for r in rules if r not in applicable]
    results, failures = {}, []
    for rule in applicable:
        value = metrics.get(f"test_{rule.metric}")
        results[str(rule)] = value
        if value is None:
            failures.append(f"test_{rule.metric} is not logged on run {run_id}")
        elif not rule.holds(value):
            failures.append(f"test_{rule.metric} {value:.4f} fails {rule}")
    figures = {"task": task, "rules": results, "skipped_for_other_task": skipped}
    if not applicable:
        return CheckResult(name, True, f"no threshold applies to a {task} model", figures)
    if failures:
        return CheckResult(name, False, "; ".join(failures), figures)
    met = ", ".join(f"{rule} ({results[rule]:.4f})" for rule in results)
    return CheckResult(name, True, f"met {met}", figures)


def schema_compatible(ctx: GateContext) -> CheckResult:
    """Every payload the champion accepts, the challenger accepts too.

    A dropped, renamed or retyped input column (or a new required one) breaks the
    clients of the current Production version; it passes only with
    ``--allow-breaking REASON``, and the reason goes into the report.
    """
    name = "schema_compatible"
    champion = ctx.champion()
    if champion is None:
        return CheckResult(name, True, "no Production version to stay compatible with")
    try:
        old = input_columns(ctx.load(champion))
        challenger = ctx.load(str(ctx.version.version))
        new, ignored = input_columns(challenger), ignored_columns(challenger)
    except Exception as exc:  # noqa: BLE001 - an unreadable contract is the verdict
        return CheckResult(name, False, f"could not read the input columns: {_first_line(exc)}")
    if old is None or new is None:
        which = champion if old is None else ctx.version.version
        return CheckResult(
            name, False, f"version {which} has no data contract or input signature to compare"
        )
    return judge_schema(old, new, champion, ctx.allow_breaking, ignored)


def judge_schema(
    old: Mapping[str, tuple[str, bool]],
    new: Mapping[str, tuple[str, bool]],
    champion: str,
    allow_breaking: str = "",
    ignored: frozenset[str] = frozenset(),
) -> CheckResult:
    """The schema verdict on given input columns (``{column: (type, required)}``).

    Args:
        old: the champion's input columns.
        new: the challenger's input columns.
        champion: the champion's version, named in the verdict.
        allow_breaking: the reason a breaking change is accepted; empty refuses it.
        ignored: columns the challenger accepts and drops unused (its contract's
            ``ignored_columns``): a champion's column among them still reaches it, so
            no client breaks.
    """
    name = "schema_compatible"
    breaking, now_ignored = [], []
    for column, (kind, _) in old.items():
        if column not in new and column in ignored:
            now_ignored.append(column)
        elif column not in new:
            breaking.append(f"drops column {column!r}")
        elif new[column][0] != kind and (kind, new[column][0]) not in WIDENING:
            breaking.append(f"retypes {column!r} {kind} → {new[column][0]}")
    for column, (kind, required) in new.items():
        if column not in old and required:
            breaking.append(f"requires new column {column!r} ({kind})")
    figures = {"champion": champion, "breaking": breaking}
    if now_ignored:
        figures["now_ignored"] = now_ignored
    if not breaking:
        unused = f" (now ignores {', '.join(map(repr, now_ignored))})" if now_ignored else ""
        detail = f"accepts every input version {champion} accepts{unused}"
        return CheckResult(name, True, detail, figures)
    summary = f"breaks clients of version {champion}: " + "; ".join(breaking)
    if allow_breaking:
        figures["allowed_because"] = allow_breaking
        return CheckResult(name, True, f"{summary} (allowed: {allow_breaking})", figures)
    return CheckResult(name, False, summary + "; pass --allow-breaking REASON to accept", figures)


def latency(ctx: GateContext) -> CheckResult:
    """Single-row and batch predict latency of the loaded version, within the policy's budget."""
    name = "latency"
    budget = ctx.policy.latency
    try:
        model = ctx.load(str(ctx.version.version))
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, False, f"does not load: {_first_line(exc)}")
    example = model.input_example
    if example is None or len(example) == 0:
        return CheckResult(name, False, "no input example to time predictions with")
    single = example.head(1)
    batch = example.sample(budget.batch_rows, replace=True, random_state=0)
    try:
        one = _timings_ms(model, single, budget.repeats)
        many = _timings_ms(model, batch, max(3, budget.repeats // 4))
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, False, f"predict failed while timing: {_first_line(exc)}")
    return judge_latency(one, many, budget)


def judge_latency(
    single_row_ms: Sequence[float], batch_ms: Sequence[float], budget: LatencyBudget
) -> CheckResult:
    """The latency verdict on given timings (milliseconds per predict call).

    Args:
        single_row_ms: timings of one-row calls.
        batch_ms: timings of calls on ``budget.batch_rows`` rows.
        budget: the policy's budget; each p95 must be within it.
    """
    figures = {
        "single_row_median_ms": _round(np.median(single_row_ms)),
        "single_row_p95_ms": _round(np.percentile(single_row_ms, 95)),
        "batch_rows": budget.batch_rows,
        "batch_median_ms": _round(np.median(batch_ms)),
        "batch_p95_ms": _round(np.percentile(batch_ms, 95)),
        "calls": {"single_row": len(single_row_ms), "batch": len(batch_ms)},
        "budget": {k: budget[k] for k in ("single_row_p95_ms", "batch_p95_ms")},
    }
    over = [
        f"{label} p95 {figures[key]:.2f} ms > budget {budget[key]:g} ms"
        for key, label in (
            ("single_row_p95_ms", "single row"),
            ("batch_p95_ms", f"{budget.batch_rows} rows"),
        )
        if figures[key] > budget[key]
    ]
    detail = (
        f"single row p95 {figures['single_row_p95_ms']:.2f} ms "
        f"(median {figures['single_row_median_ms']:.2f}), "
        f"{budget.batch_rows} rows p95 {figures['batch_p95_ms']:.1f} ms "
        f"(median {figures['batch_median_ms']:.1f})"
    )
    if over:
        return CheckResult("latency", False, "; ".join(over), figures)
    return CheckResult("latency", True, detail, figures)


def beats_champion(ctx: GateContext) -> CheckResult:
    """Champion vs challenger by a paired bootstrap CI: on live rows when enough, else offline.

    Under ``serve --shadow`` the challenger (the Staging version) answered Production's
    live requests as a shadow; with at least ``comparison.live.min_rows`` of those rows
    labelled in the last ``comparison.live.since``, both are judged on them ("don't
    rely on offline evaluation"). Otherwise both are scored on the challenger's test
    split. The same rule decides either way (:func:`_compare.decide`), and the report
    says which evidence it used (``figures["evidence"]``: ``live`` or ``offline``).
    """
    name = "beats_champion"
    champion = ctx.champion()
    if champion is None:
        return CheckResult(name, True, "no champion yet: the absolute thresholds decide")
    live = ctx.policy.comparison.live
    pairs, why_not = _live_pairs(ctx, champion)
    if pairs is not None and pairs.rows >= live.min_rows:
        verdict = _compare.compare_live(pairs, ctx.policy.comparison)
        figures = {**verdict.figures, "evidence": "live", "live_since": live.since}
        return CheckResult(name, verdict.passed, f"live: {verdict.detail}", figures)
    if why_not is None:
        why_not = (
            f"{pairs.rows if pairs else 0} labelled live rows of v{ctx.version.version} "
            f"shadowing v{champion} in the last {live.since} < comparison.live.min_rows "
            f"{live.min_rows}"
        )
    verdict = _compare.compare(ctx, champion)
    figures = {
        **verdict.figures,
        "evidence": "offline",
        "live_rows": pairs.rows if pairs else 0,
        "live_min_rows": live.min_rows,
    }
    return CheckResult(name, verdict.passed, f"{verdict.detail} (offline: {why_not})", figures)


def _live_pairs(ctx: GateContext, champion: str):
    """The labelled live rows champion and challenger both answered, or (None, why not)."""
    # The monitor reads the inference log; imported here, since only this check needs it.
    from monitoring import shadow  # noqa: PLC0415
    from monitoring.window import Window  # noqa: PLC0415

    task = ctx.task()
    if task not in TASK_METRICS:
        return None, f"version {ctx.version.version} has no task"
    try:
        window = Window.ending_now(ctx.policy.comparison.live.since)
        found = shadow.pairs(
            ctx.client, ctx.model, champion, str(ctx.version.version), window, task
        )
    except Exception as exc:  # noqa: BLE001 - no live evidence is no reason to refuse
        return None, f"could not read the live rows: {_first_line(exc)}"
    return found, None


# The checks each target stage runs, cheapest first.
GATES: dict[str, tuple[Check, ...]] = {
    STAGING: (loads_and_predicts, thresholds, schema_compatible, latency),
    PRODUCTION: (from_staging, loads_and_predicts, thresholds, schema_compatible, beats_champion),
}
# Rollback is the emergency exit: no comparison, but the target must still work.
ROLLBACK_GATE: tuple[Check, ...] = (loads_and_predicts,)


def run(ctx: GateContext, checks: tuple[Check, ...]) -> list[CheckResult]:
    """Run every check (a refusal reports all of them, not only the first failure)."""
    return [check(ctx) for check in checks]


def _timings_ms(model, frame: pd.DataFrame, repeats: int) -> list[float]:
    model.predict(frame)  # warm-up: first-call costs are not steady-state latency
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(frame)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _round(value, digits: int = 3) -> float:
    return round(float(value), digits)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
