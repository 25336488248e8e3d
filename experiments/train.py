"""Train one pipeline, log everything a reviewer needs, register a new model version."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow

from experiments import artifacts, data, data_check, evaluate, families
from stageflow import tracking

logger = logging.getLogger(__name__)

DEFAULT_FAMILY = families.HGB
DEFAULT_SEED = 42


@dataclass
class TrainResult:
    run_id: str
    model_name: str
    version: str
    metrics: dict[str, float]
    task: str = ""
    family: str = ""
    experiment_id: str = ""
    tracking_uri: str = field(default="", repr=False)
    data_check: dict = field(default_factory=dict, repr=False)
    data_check_summary: str = field(default="", repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in JSON_KEYS}

    @property
    def run_url(self) -> str:
        return f"{self.tracking_uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


JSON_KEYS = ("run_id", "model_name", "version", "metrics", "task", "family", "data_check")


def default_model_name(source: str) -> str:
    """``builtin:wine`` → ``wine``; ``data/churn 2024.csv`` → ``churn-2024``."""
    if source.startswith(data.BUILTIN_PREFIX):
        return source[len(data.BUILTIN_PREFIX) :]
    return "-".join(Path(source).stem.split())


# Lives in `data` so tuning's worker processes need not import training (and skops).
prepare_features = data.prepare_features


def train(
    source: str,
    target: str,
    model_name: str | None = None,
    family: str = DEFAULT_FAMILY,
    params: dict | None = None,
    seed: int = DEFAULT_SEED,
    task: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    id_columns=(),
    strict: bool = False,
    checks: data_check.CheckConfig = data_check.DEFAULT_CONFIG,
) -> TrainResult:
    """Train ``family`` on ``source``, log the run and register a new version of ``model_name``.

    Example:
        >>> train("builtin:wine", "target", model_name="wine", family="rf")

    Args:
        id_columns: columns to treat as identifiers (dropped, ignored in requests)
            whatever the data check would make of them.
        strict: refuse the data when the check finds leakage or too-small classes.
        checks: the data check's thresholds.

    Raises:
        UsageError: bad data source, target, family or parameter.
        DataCheckRefused: ``strict`` and the data check found leakage or small classes.
        TrackingServerUnreachable: the tracking server did not answer.
    """
    uri = tracking.require_server(tracking_uri)
    model_name = model_name or default_model_name(source)
    frame = data.load(source)
    checked = data_check.check(
        frame, target, seed=seed, task=task, id_columns=id_columns, strict=strict, config=checks
    )
    X, splits, task = checked.X, checked.splits, checked.task
    pipeline = families.build(family, task, X, seed, params)
    logger.info(
        "training %s (%s) on %s: %d train / %d validation / %d test rows",
        family,
        task,
        source,
        len(splits.X_train),
        len(splits.X_val),
        len(splits.X_test),
    )

    # Inside `mlflow run` the run already exists (MLFLOW_RUN_ID) and its experiment is set.
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment or model_name)
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"train-{family}") as run:
        mlflow.set_tags(
            {
                "stageflow.kind": "train",
                "stageflow.task": task,
                "stageflow.family": family,
                "stageflow.model_name": model_name,
            }
        )
        tracking.log_params(
            {
                "data": source,
                "target": target,
                "family": family,
                "task": task,
                "seed": seed,
                "n_features": X.shape[1],
                "n_train": len(splits.X_train),
                **{f"model.{k}": v for k, v in (params or {}).items()},
            }
        )
        artifacts.log_environment()
        data_check.log(checked.report)
        artifacts.log_lineage(splits, source, target)
        pipeline.fit(splits.X_train, splits.y_train)
        mlflow.log_metric("fit_seconds", time.perf_counter() - started)
        logger.info("fitted in %.1fs; evaluating and logging plots", time.perf_counter() - started)
        scores = artifacts.log_evaluation(pipeline, splits, task, seed)
        logger.info("logging and registering the model as %s", model_name)
        info = artifacts.log_pipeline(
            pipeline,
            splits,
            task,
            model_name,
            date_formats=checked.plan.dates,
            ignored_columns=checked.plan.ignored,
        )
        version = str(info.registered_model_version)
        primary, _ = evaluate.PRIMARY_METRIC[task]
        client = mlflow.MlflowClient()
        client.set_model_version_tag(model_name, version, "stageflow.task", task)
        client.set_model_version_tag(model_name, version, "stageflow.family", family)
        client.update_model_version(
            model_name,
            version,
            description=(
                f"{families.FAMILY_NAMES[family]} trained on {source} "
                f"(seed {seed}); test {primary} {scores[f'test_{primary}']:.4f}"
            ),
        )
    return TrainResult(
        run_id=run.info.run_id,
        model_name=model_name,
        version=version,
        metrics={k: round(v, 6) for k, v in scores.items()},
        task=task,
        family=family,
        experiment_id=run.info.experiment_id,
        tracking_uri=uri,
        data_check=checked.report.to_json(),
        data_check_summary=checked.report.summary(),
    )
