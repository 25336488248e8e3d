"""Gates: the checks a version must pass before it enters a stage, judged by a policy.

A gate is a list of checks; each takes the :class:`GateContext` and returns a
:class:`CheckResult` saying what it measured (``figures``) and whether that
passed. The numbers it judges by come from the policy (``registry.policy``), never
from the code. Adding a check means writing one function and listing it in :data:`GATES`.

- Staging: loads and predicts its input example; absolute thresholds on its test
  metrics; input schema compatible with the current Production version; latency
  within budget.
- Production: comes from Staging; loads and predicts; thresholds; schema; and the
  champion-vs-challenger comparison on the challenger's held-out test split.
- Rollback: loads and predicts, nothing else (it is the emergency exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_RUN_ID

from registry import ledger
from registry._stages import PRODUCTION, STAGING, current_version
from registry.policy import TASK_METRICS, Policy
from stageflow import tracking
from stageflow.catalog import CLASSIFICATION, PRIMARY_METRIC, TEST_SPLIT_ARTIFACT
from stageflow.contract import input_columns

logger = logging.getLogger(__name__)

TASK_TAG = "stageflow.task"
TARGET_PARAM = "target"
# mlflow.models.evaluate's names for the primary metrics (stageflow.catalog.PRIMARY_METRIC).
EVALUATE_METRIC = {"accuracy": "accuracy_score", "rmse": "root_mean_squared_error"}
MODEL_TYPE = {CLASSIFICATION: "classifier", "regression": "regressor"}
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
    _models: dict = field(default_factory=dict, repr=False)

    def load(self, version: str):
        """The pyfunc model of ``version``, loaded once per gate run."""
        if version not in self._models:
            self._models[version] = mlflow.pyfunc.load_model(f"models:/{self.model}/{version}")
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
    name = "thresholds"
    rules = ctx.policy.thresholds
    if not rules:
        return CheckResult(name, True, "the policy sets no thresholds")
    run = ctx.run()
    if run is None:
        return CheckResult(name, False, f"version {ctx.version.version} has no training run")
    task = ctx.task()
    metrics = run.data.metrics
    applicable = [r for r in rules if task is None or r.metric in TASK_METRICS.get(task, ())]
    skipped = [str(r) for r in rules if r not in applicable]
    results, failures = {}, []
    for rule in applicable:
        value = metrics.get(f"test_{rule.metric}")
        results[str(rule)] = value
        if value is None:
            failures.append(f"test_{rule.metric} is not logged on run {run.info.run_id}")
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
        new = input_columns(ctx.load(str(ctx.version.version)))
    except Exception as exc:  # noqa: BLE001 - an unreadable contract is the verdict
        return CheckResult(name, False, f"could not read the input columns: {_first_line(exc)}")
    if old is None or new is None:
        which = champion if old is None else ctx.version.version
        return CheckResult(
            name, False, f"version {which} has no data contract or input signature to compare"
        )
    breaking = []
    for column, (kind, _) in old.items():
        if column not in new:
            breaking.append(f"drops column {column!r}")
        elif new[column][0] != kind and (kind, new[column][0]) not in WIDENING:
            breaking.append(f"retypes {column!r} {kind} → {new[column][0]}")
    for column, (kind, required) in new.items():
        if column not in old and required:
            breaking.append(f"requires new column {column!r} ({kind})")
    figures = {"champion": champion, "breaking": breaking}
    if not breaking:
        return CheckResult(name, True, f"accepts every input version {champion} accepts", figures)
    summary = f"breaks clients of version {champion}: " + "; ".join(breaking)
    if ctx.allow_breaking:
        figures["allowed_because"] = ctx.allow_breaking
        return CheckResult(name, True, f"{summary} (allowed: {ctx.allow_breaking})", figures)
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
    repeats = budget["repeats"]
    single = example.head(1)
    batch = example.sample(budget["batch_rows"], replace=True, random_state=0)
    try:
        one = _timings_ms(model, single, repeats)
        many = _timings_ms(model, batch, max(3, repeats // 4))
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, False, f"predict failed while timing: {_first_line(exc)}")
    figures = {
        "single_row_median_ms": _round(np.median(one)),
        "single_row_p95_ms": _round(np.percentile(one, 95)),
        "batch_rows": budget["batch_rows"],
        "batch_median_ms": _round(np.median(many)),
        "batch_p95_ms": _round(np.percentile(many, 95)),
        "calls": {"single_row": len(one), "batch": len(many)},
        "budget": {k: budget[k] for k in ("single_row_p95_ms", "batch_p95_ms")},
    }
    over = [
        f"{label} p95 {figures[key]:.2f} ms > budget {budget[key]:g} ms"
        for key, label in (
            ("single_row_p95_ms", "single row"),
            ("batch_p95_ms", f"{budget['batch_rows']} rows"),
        )
        if figures[key] > budget[key]
    ]
    detail = (
        f"single row p95 {figures['single_row_p95_ms']:.2f} ms "
        f"(median {figures['single_row_median_ms']:.2f}), "
        f"{budget['batch_rows']} rows p95 {figures['batch_p95_ms']:.1f} ms "
        f"(median {figures['batch_median_ms']:.1f})"
    )
    if over:
        return CheckResult(name, False, "; ".join(over), figures)
    return CheckResult(name, True, detail, figures)


def beats_champion(ctx: GateContext) -> CheckResult:
    """Champion and challenger scored on the challenger's test split; paired bootstrap CI.

    Passes when the challenger is not worse than the champion by more than the
    policy's margin (the CI's lower bound of challenger-minus-champion, oriented so
    that positive is better, is at least ``-margin × |champion's score|``), or, when
    the policy requires improvement, when that lower bound is above zero.
    """
    name = "beats_champion"
    champion = ctx.champion()
    if champion is None:
        return CheckResult(name, True, "no champion yet: the absolute thresholds decide")
    task, run = ctx.task(), ctx.run()
    if task not in PRIMARY_METRIC or run is None:
        return CheckResult(
            name, False, f"version {ctx.version.version} was not trained by Stageflow (no task)"
        )
    # Read back unquoted: under `mlflow run` the runner's record of it is shell-quoted.
    target = tracking.plain_params(run).get(TARGET_PARAM)
    try:
        frame = _test_split(run.info.run_id)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(
            name, False, f"no held-out test split {TEST_SPLIT_ARTIFACT}: {_first_line(exc)}"
        )
    if target not in frame.columns:
        return CheckResult(name, False, f"the test split has no target column {target!r}")
    metric, higher_is_better = PRIMARY_METRIC[task]
    challenger = str(ctx.version.version)
    X, y = frame.drop(columns=[target]), frame[target]
    predictions, scores = {}, {}
    for role, version in (("challenger", challenger), ("champion", champion)):
        try:
            model = ctx.load(version)
            predictions[role] = np.asarray(model.predict(X)).reshape(len(X), -1)[:, 0]
            scores[role] = _evaluate(ctx, model, frame, target, task, role, version)
        except Exception as exc:  # noqa: BLE001
            if role == "champion" and ctx.allow_breaking:
                return CheckResult(
                    name,
                    True,
                    f"champion version {champion} cannot score the challenger's data "
                    f"({_first_line(exc)}); breaking change allowed, thresholds decide",
                    {"champion": champion, "allowed_because": ctx.allow_breaking},
                )
            return CheckResult(
                name, False, f"{role} version {version} could not be scored: {_first_line(exc)}"
            )
    cfg = ctx.policy.comparison
    per_row = {role: _per_row(task, y.to_numpy(), p) for role, p in predictions.items()}
    low, high, point = paired_bootstrap(
        per_row["challenger"],
        per_row["champion"],
        metric,
        higher_is_better,
        cfg["resamples"],
        cfg["confidence"],
    )
    allowed = cfg["margin"] * abs(scores["champion"])
    if cfg["require_improvement"]:
        passed, rule = low > 0, "better with confidence: CI lower bound > 0"
    else:
        passed, rule = low >= -allowed, f"non-inferior: CI lower bound ≥ -{allowed:.4g}"
    figures = {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "champion": champion,
        "challenger": challenger,
        "rows": len(frame),
        "champion_score": _round(scores["champion"], 6),
        "challenger_score": _round(scores["challenger"], 6),
        "improvement": _round(point, 6),
        "ci_low": _round(low, 6),
        "ci_high": _round(high, 6),
        "confidence": cfg["confidence"],
        "resamples": cfg["resamples"],
        "margin": cfg["margin"],
        "allowed_degradation": _round(allowed, 6),
        "rule": rule,
    }
    detail = (
        f"{metric} on {len(frame)} held-out rows: challenger v{challenger} "
        f"{scores['challenger']:.4f} vs champion v{champion} {scores['champion']:.4f}; "
        f"improvement {point:+.4f}, {cfg['confidence']:.0%} CI [{low:+.4f}, {high:+.4f}]; "
        f"{'passes' if passed else 'fails'} {rule}"
    )
    return CheckResult(name, passed, detail, figures)


def paired_bootstrap(
    challenger: np.ndarray,
    champion: np.ndarray,
    metric: str,
    higher_is_better: bool,
    resamples: int,
    confidence: float,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile CI of the challenger's improvement over the champion, rows resampled in pairs.

    ``challenger``/``champion`` are per-row values (1/0 correct for accuracy, squared
    error for RMSE); both are resampled with the same indices, so the CI reflects
    how the two models differ on the same rows. Positive means the challenger is better.

    Returns:
        (low, high, point estimate).
    """
    aggregate = (
        (lambda a: np.sqrt(a.mean(axis=-1))) if metric == "rmse" else (lambda a: a.mean(axis=-1))
    )
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(seed)
    n = len(challenger)
    diffs = []
    chunk = max(1, 2_000_000 // n)  # bounded memory on large test splits
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        diffs.append(sign * (aggregate(challenger[idx]) - aggregate(champion[idx])))
    diffs = np.concatenate(diffs)
    tail = (1 - confidence) / 2 * 100
    point = sign * (aggregate(challenger) - aggregate(champion))
    return float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail)), float(point)


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


def _test_split(run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp
        )
        return pd.read_parquet(Path(path))


def _evaluate(ctx, model, frame, target, task, role, version) -> float:
    """Score one version with ``mlflow.models.evaluate`` in an evaluation run of the ledger."""
    metric, _ = PRIMARY_METRIC[task]
    tags = {
        "stageflow.kind": "evaluation",
        "stageflow.evaluated_model": ctx.model,
        "stageflow.evaluated_version": version,
        "stageflow.role": role,
    }
    if ctx.evaluation_parent:
        tags["mlflow.parentRunId"] = ctx.evaluation_parent
    with (
        _no_inherited_run(),
        mlflow.start_run(
            experiment_id=ledger.experiment_id(ctx.client),
            run_name=f"evaluate {ctx.model} v{version} ({role})",
            tags=tags,
            nested=True,
        ),
    ):
        result = mlflow.models.evaluate(
            model,
            frame,
            targets=target,
            model_type=MODEL_TYPE[task],
            evaluators=["default"],
            evaluator_config={
                "default": {"log_model_explainability": False, "metric_prefix": f"{role}_"}
            },
        )
    return float(result.metrics[f"{role}_{EVALUATE_METRIC[metric]}"])


@contextlib.contextmanager
def _no_inherited_run():
    """Inside `mlflow run`, MLFLOW_RUN_ID would make start_run resume the entry point's run."""
    inherited = os.environ.pop(MLFLOW_RUN_ID.name, None)
    try:
        yield
    finally:
        if inherited is not None:
            os.environ[MLFLOW_RUN_ID.name] = inherited


def _per_row(task: str, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    if task == CLASSIFICATION:
        return (predicted == truth).astype(float)
    return (predicted.astype(float) - truth.astype(float)) ** 2


def _round(value, digits: int = 3) -> float:
    return round(float(value), digits)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
