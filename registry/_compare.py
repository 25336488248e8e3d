"""Champion vs challenger: score both on the challenger's held-out test split and judge.

The gate ``beats_champion`` (``registry.gates``) is a thin door onto :func:`compare`:
both versions are scored with ``mlflow.models.evaluate`` (one evaluation run each in the
ledger), the per-row scores give a paired bootstrap interval of the challenger's
improvement (``scipy.stats.bootstrap``), and :func:`decide` applies the policy to those
figures — the last two need no server and are tested in the fast tier.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_RUN_ID

from registry import ledger
from registry.policy import ComparisonPolicy
from stageflow import tracking
from stageflow.catalog import CLASSIFICATION, PRIMARY_METRIC, TEST_SPLIT_ARTIFACT

if TYPE_CHECKING:
    from registry.gates import GateContext

logger = logging.getLogger(__name__)

TARGET_PARAM = "target"
# mlflow.models.evaluate's names for the primary metrics (stageflow.catalog.PRIMARY_METRIC).
EVALUATE_METRIC = {"accuracy": "accuracy_score", "rmse": "root_mean_squared_error"}
MODEL_TYPE = {CLASSIFICATION: "classifier", "regression": "regressor"}
# Resampled rows held in memory at once (resamples × rows), so large test splits stay flat.
_BOOTSTRAP_CELLS = 2_000_000
# What the first mlflow.models.evaluate imports from inside MLflow's import-hook lock
# (see import_evaluation).
_EVALUATION_MODULES = (
    "mlflow.models.evaluation.evaluators.classifier",
    "mlflow.models.evaluation.evaluators.default",
    "mlflow.models.evaluation.evaluators.regressor",
    "mlflow.models.evaluation.evaluators.shap",
    "mlflow.models.evaluation.evaluator_registry",
)


@dataclass(frozen=True)
class Comparison:
    """The verdict on one challenger: passed or not, one line why, and the figures."""

    passed: bool
    detail: str
    figures: dict = field(default_factory=dict)


def compare(ctx: GateContext, champion: str) -> Comparison:
    """Score challenger and ``champion`` on the challenger's test split and apply the policy.

    Args:
        ctx: the gate run (client, model, the version being judged, policy, loaded models).
        champion: the current Production version.

    Returns:
        The verdict; a version that cannot be judged (no task, no test split, cannot be
        scored) fails with the reason, except that a champion unable to read a breaking
        challenger's data passes when the breaking change is allowed.
    """
    task, run = ctx.task(), ctx.run()
    if task not in PRIMARY_METRIC or run is None:
        return Comparison(
            False, f"version {ctx.version.version} was not trained by Stageflow (no task)"
        )
    # Read back unquoted: under `mlflow run` the runner's record of it is shell-quoted.
    target = tracking.plain_params(run).get(TARGET_PARAM)
    try:
        frame = _test_split(run.info.run_id)
    except Exception as exc:  # noqa: BLE001 - a missing split is the verdict
        return Comparison(
            False, f"no held-out test split {TEST_SPLIT_ARTIFACT}: {_first_line(exc)}"
        )
    if target not in frame.columns:
        return Comparison(False, f"the test split has no target column {target!r}")
    challenger = str(ctx.version.version)
    X, y = frame.drop(columns=[target]), frame[target]
    predictions, scores = {}, {}
    for role, version in (("challenger", challenger), ("champion", champion)):
        try:
            model = ctx.load(version)
            predictions[role] = np.asarray(model.predict(X)).reshape(len(X), -1)[:, 0]
            scores[role] = _evaluate(ctx, model, frame, target, task, role, version)
        except Exception as exc:  # noqa: BLE001 - a version that cannot score is the verdict
            if role == "champion" and ctx.allow_breaking:
                return Comparison(
                    True,
                    f"champion version {champion} cannot score the challenger's data "
                    f"({_first_line(exc)}); breaking change allowed, thresholds decide",
                    {"champion": champion, "allowed_because": ctx.allow_breaking},
                )
            return Comparison(
                False, f"{role} version {version} could not be scored: {_first_line(exc)}"
            )
    metric, higher_is_better = PRIMARY_METRIC[task]
    cfg = ctx.policy.comparison
    truth = y.to_numpy()
    low, high, point = paired_bootstrap(
        per_row(task, truth, predictions["challenger"]),
        per_row(task, truth, predictions["champion"]),
        metric,
        higher_is_better,
        cfg.resamples,
        cfg.confidence,
    )
    return decide(
        metric=metric,
        higher_is_better=higher_is_better,
        champion=champion,
        challenger=challenger,
        rows=len(frame),
        champion_score=scores["champion"],
        challenger_score=scores["challenger"],
        interval=(low, high, point),
        policy=cfg,
    )


def decide(
    *,
    metric: str,
    higher_is_better: bool,
    champion: str,
    challenger: str,
    rows: int,
    champion_score: float,
    challenger_score: float,
    interval: tuple[float, float, float],
    policy: ComparisonPolicy,
    evidence: str = "held-out",
) -> Comparison:
    """The comparison's verdict on given figures.

    Passes when the challenger is not worse than the champion by more than the
    policy's margin (the interval's lower bound of challenger-minus-champion, oriented
    so that positive is better, is at least ``-margin × |champion's score|``), or, when
    the policy requires improvement, when that lower bound is above zero.

    Args:
        interval: (low, high, point) of the improvement, as :func:`paired_bootstrap` gives.
        evidence: which rows the scores are on, named in the verdict ("held-out", "live").
    """
    low, high, point = interval
    allowed = policy.margin * abs(champion_score)
    if policy.require_improvement:
        passed, rule = low > 0, "better with confidence: CI lower bound > 0"
    else:
        passed, rule = low >= -allowed, f"non-inferior: CI lower bound ≥ -{allowed:.4g}"
    figures = {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "champion": champion,
        "challenger": challenger,
        "rows": rows,
        "champion_score": _round(champion_score, 6),
        "challenger_score": _round(challenger_score, 6),
        "improvement": _round(point, 6),
        "ci_low": _round(low, 6),
        "ci_high": _round(high, 6),
        "confidence": policy.confidence,
        "resamples": policy.resamples,
        "margin": policy.margin,
        "allowed_degradation": _round(allowed, 6),
        "rule": rule,
    }
    detail = (
        f"{metric} on {rows} {evidence} rows: challenger v{challenger} "
        f"{challenger_score:.4f} vs champion v{champion} {champion_score:.4f}; "
        f"improvement {point:+.4f}, {policy.confidence:.0%} CI [{low:+.4f}, {high:+.4f}]; "
        f"{'passes' if passed else 'fails'} {rule}"
    )
    return Comparison(passed, detail, figures)


def compare_live(pairs, policy: ComparisonPolicy) -> Comparison:
    """The same rule as :func:`compare`, on the live rows both versions answered.

    Args:
        pairs: ``monitoring.shadow.Pairs`` — the labelled rows the champion answered and
            the challenger shadowed (``serve --shadow``), and each one's predictions.
    """
    metric, higher_is_better = PRIMARY_METRIC[pairs.task]
    challenger_scores, champion_scores = pairs.scores()
    aggregate = _rmse if metric == "rmse" else _mean
    return decide(
        metric=metric,
        higher_is_better=higher_is_better,
        champion=pairs.production,
        challenger=pairs.shadow,
        rows=pairs.rows,
        champion_score=float(aggregate(champion_scores, -1)),
        challenger_score=float(aggregate(challenger_scores, -1)),
        interval=paired_bootstrap(
            challenger_scores,
            champion_scores,
            metric,
            higher_is_better,
            policy.resamples,
            policy.confidence,
        ),
        policy=policy,
        evidence="labelled live",
    )


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
    error for RMSE); ``scipy.stats.bootstrap(paired=True)`` resamples both with the same
    indices, so the CI reflects how the two models differ on the same rows. Positive
    means the challenger is better. Seeded: the same figures give the same interval.

    Returns:
        (low, high, point estimate).
    """
    challenger = np.asarray(challenger, dtype=float)
    champion = np.asarray(champion, dtype=float)
    sign = 1.0 if higher_is_better else -1.0
    aggregate = _rmse if metric == "rmse" else _mean

    def improvement(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return sign * (aggregate(a, axis) - aggregate(b, axis))

    point = float(improvement(challenger, champion))
    if len(challenger) < 2:  # nothing to resample: the interval is the point
        return point, point, point
    # Imported here: scipy.stats costs ~1 s, and every registry command imports this module.
    from scipy import stats  # noqa: PLC0415

    result = stats.bootstrap(
        (challenger, champion),
        improvement,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        batch=max(1, _BOOTSTRAP_CELLS // len(challenger)),
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high), point


def per_row(task: str, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-row scores the bootstrap resamples: 1/0 correct, or the squared error."""
    if task == CLASSIFICATION:
        return (predicted == truth).astype(float)
    return (predicted.astype(float) - truth.astype(float)) ** 2


def _mean(values: np.ndarray, axis: int) -> np.ndarray:
    return values.mean(axis=axis)


def _rmse(squared_errors: np.ndarray, axis: int) -> np.ndarray:
    return np.sqrt(squared_errors.mean(axis=axis))


def _test_split(run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp
        )
        return pd.read_parquet(Path(path))


def import_evaluation() -> None:
    """Import what the first ``mlflow.models.evaluate`` would import under MLflow's hook lock.

    MLflow fires a post-import hook at once, still holding its import-hook lock, when
    the hooked module is already imported (``register_post_import_hook``; mlflow#23466
    moved only ``notify_module_loaded``'s hooks outside the lock). A process's first
    evaluation does that twice: the evaluator registry imports the evaluators, and the
    evaluation's autologging set-up imports the MLflow flavor module of every library
    already imported (scikit-learn's). Meanwhile any other thread that imports takes
    Python's import lock and then waits in MLflow's import finder for the hook lock --
    MLflow's REST client imports on every call, so a controller polling the registry on
    a thread (``serving.controller.BackgroundServe``) deadlocked the Production gate of
    a promotion in the same process. Imported here first, outside that lock, those
    modules leave the hooks nothing to import. Idempotent and cheap after the first call.
    """
    from mlflow.ml_package_versions import FLAVOR_TO_MODULE_NAME  # noqa: PLC0415
    from mlflow.utils.autologging_utils import is_autolog_supported  # noqa: PLC0415

    for name in _EVALUATION_MODULES:
        importlib.import_module(name)
    for flavor, module in FLAVOR_TO_MODULE_NAME.items():
        if module in sys.modules and is_autolog_supported(flavor):
            importlib.import_module(f"mlflow.{flavor}")


def _evaluate(ctx: GateContext, model, frame, target, task, role, version) -> float:
    """Score one version with ``mlflow.models.evaluate`` in an evaluation run of the ledger."""
    metric, _ = PRIMARY_METRIC[task]
    import_evaluation()
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


def _round(value, digits: int = 3) -> float:
    return round(float(value), digits)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
