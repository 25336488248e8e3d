"""Tune: one Optuna study per call, every trial a nested MLflow run, the best refit and registered.

One parent run per invocation holds the study's settings, its best params and score,
its plots and its trials as CSV; each trial is a child run named ``trial-N`` with its
params, its fold metrics (mean and std) and its state. ``workers`` processes share
one study through Optuna's RDB storage (SQLite by default, PostgreSQL for several
machines) and log their trials under the same parent. The best trial's pipeline is
then refit on the training split, evaluated and logged exactly as ``train`` does
(:mod:`experiments.artifacts`), and registered as a new version.

Example:
    >>> tune("builtin:breast_cancer", "target", model_name="cancer", n_trials=30, workers=2)
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import optuna
from mlflow.entities import RunStatus

from experiments import _study, artifacts, data, data_check, families
from experiments._objective import FAMILY_PARAM, choose_metric, estimator_params
from experiments._shield import ignoring_sigint
from experiments._trial_runs import STUDY_TAG
from experiments._tuning_plots import figures, trials_frame
from experiments._workers import (  # noqa: F401 - run_trials and prepare: the benchmark's doors
    PRUNER_STARTUP_TRIALS,
    StudyJob,
    WorkerPool,
    prepare,
    run_trials,
    run_workers,
    threads_per_worker,
)
from experiments.train import DEFAULT_SEED, default_model_name
from stageflow import tracking
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 3
DEFAULT_FAMILIES = families.FAMILIES
SETTINGS_ATTR_PREFIX = "stageflow."
TUNE_KIND = "tune"
PLOTS_DIR = "tuning"
TRIALS_CSV = "tuning/trials.csv"


@dataclass
class TuneResult:
    parent_run_id: str
    best_trial: int
    best_value: float
    model_name: str
    version: str
    study_name: str
    storage: str
    metric: str
    direction: str
    best_params: dict = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    experiment_id: str = ""
    tracking_uri: str = field(default="", repr=False)
    data_check: dict = field(default_factory=dict, repr=False)
    data_check_summary: str = field(default="", repr=False)

    def to_json(self) -> dict:
        keys = ("parent_run_id", "best_trial", "best_value", "model_name", "version")
        keys += ("study_name", "storage", "metric", "direction", "best_params", "trials")
        keys += ("data_check",)
        return {k: getattr(self, k) for k in keys}

    @property
    def run_url(self) -> str:
        return f"{self.tracking_uri}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"


def tune(
    source: str,
    target: str,
    n_trials: int,
    *,
    model_name: str | None = None,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    metric: str | None = None,
    families: tuple[str, ...] = DEFAULT_FAMILIES,
    folds: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
    task: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = False,
    worker_start: str = "spawn",
    id_columns=(),
    strict: bool = False,
    checks: data_check.CheckConfig = data_check.DEFAULT_CONFIG,
) -> TuneResult:
    """Run ``n_trials`` more trials of a study, then refit, log and register the best.

    Args:
        storage: ``sqlite:///PATH`` or ``postgresql://USER@HOST/DB`` (default: SQLite
            under ``STAGEFLOW_HOME``). The same ``study_name`` there resumes the study.
        metric: what to optimise (default: accuracy or rmse); its direction follows.
        progress: draw a progress bar on stderr.
        worker_start: how extra workers start, ``"spawn"`` (safe anywhere) or ``"fork"``
            (fast; only from a process that has run nothing yet: see ``WorkerPool``).
        id_columns, strict, checks: the data check's, as for :func:`experiments.train.train`.

    Raises:
        UsageError: bad arguments, data, storage scheme, or a study made for other data.
        StageflowError: storage or tracking server unreachable; no trial completed.
    """
    families = _check_arguments(n_trials, workers, folds, timeout, families)
    # Optuna's per-trial INFO lines would bury the progress bar; -v brings them back.
    verbosity = (
        optuna.logging.INFO if logger.isEnabledFor(logging.DEBUG) else optuna.logging.WARNING
    )
    optuna.logging.set_verbosity(verbosity)
    storage_uri = _study.normalize(storage or _study.default_storage_uri())
    uri = tracking.require_server(tracking_uri)
    # Extra workers start now: their few seconds of imports overlap the setup below.
    pool = WorkerPool(min(workers, n_trials) - 1, worker_start) if workers > 1 else None
    try:
        return _run_study(
            source,
            target,
            n_trials,
            model_name=model_name or default_model_name(source),
            workers=workers,
            storage_uri=storage_uri,
            study_name=study_name,
            timeout=timeout,
            metric=metric,
            families=families,
            folds=folds,
            seed=seed,
            task=task,
            experiment=experiment,
            tracking_uri=uri,
            progress=progress,
            verbosity=verbosity,
            pool=pool,
            id_columns=id_columns,
            strict=strict,
            checks=checks,
        )
    finally:
        if pool:
            pool.close()


def _run_study(
    source,
    target,
    n_trials,
    *,
    model_name,
    workers,
    storage_uri,
    study_name,
    timeout,
    metric,
    families,
    folds,
    seed,
    task,
    experiment,
    tracking_uri,
    progress,
    verbosity,
    pool,
    id_columns,
    strict,
    checks,
) -> TuneResult:
    uri = tracking_uri
    checked = data_check.check(
        data.load(source),
        target,
        seed=seed,
        task=task,
        id_columns=id_columns,
        strict=strict,
        config=checks,
    )
    X, splits, task = checked.X, checked.splits, checked.task
    metric, direction = choose_metric(task, metric)
    study_name = study_name or f"{model_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    settings = {
        "data": source,
        "target": target,
        "task": task,
        "metric": metric,
        "families": ",".join(families),
        "folds": folds,
        "seed": seed,
    }
    study = _create_or_resume(_study.open_storage(storage_uri), study_name, direction, settings)
    masked = _study.mask(storage_uri)
    logger.info(
        "study %s in %s: %d trials so far, %d more with %d worker(s)",
        study_name,
        masked,
        len(study.trials),
        n_trials,
        workers,
    )

    # Inside `mlflow run` the run already exists (MLFLOW_RUN_ID) and its experiment is set.
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment or model_name)
    parent = mlflow.start_run(run_name=f"tune-{study_name}")
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        mlflow.set_tags(
            {
                "stageflow.kind": TUNE_KIND,
                "stageflow.task": task,
                "stageflow.model_name": model_name,
                STUDY_TAG: study_name,
                "optuna.study.storage": masked,
            }
        )
        tracking.log_params(
            {
                "data": source,
                "target": target,
                "task": task,
                "seed": seed,
                "n_features": X.shape[1],
                "n_train": len(splits.X_train),
                "study.name": study_name,
                "study.storage": masked,
                "study.metric": metric,
                "study.direction": direction,
                "study.n_trials": n_trials,
                "study.workers": workers,
                "study.folds": folds,
                "study.families": ",".join(families),
                "study.timeout": timeout,
                "study.sampler": "TPE (multivariate, grouped)",
                "study.pruner": f"median (after {PRUNER_STARTUP_TRIALS} trials, per fold)",
            }
        )
        artifacts.log_environment()
        data_check.log(checked.report)
        artifacts.log_lineage(splits, source, target)
        job = StudyJob(
            source=source,
            target=target,
            task=task,
            metric=metric,
            families=families,
            folds=folds,
            seed=seed,
            storage_uri=storage_uri,
            study_name=study_name,
            tracking_uri=uri,
            experiment_id=parent.info.experiment_id,
            parent_run_id=parent.info.run_id,
            threads=threads_per_worker(workers),
            optuna_verbosity=verbosity,
            plan=checked.plan,
        )
        already = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        started = time.perf_counter()
        run_workers(job, workers, n_trials, timeout, progress=progress, pool=pool)
        mlflow.log_metric("tune_seconds", time.perf_counter() - started)
        result = _conclude(study, job, model_name, X, splits, direction, already)
        result.storage, result.tracking_uri = masked, uri
        result.data_check = checked.report.to_json()
        result.data_check_summary = checked.report.summary()
        status = RunStatus.to_string(RunStatus.FINISHED)
        return result
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        with ignoring_sigint():
            mlflow.end_run(status)


def _check_arguments(n_trials, workers, folds, timeout, choices) -> tuple[str, ...]:
    if n_trials < 1:
        raise UsageError(f"--n-trials must be at least 1, got {n_trials}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if folds < 2:
        raise UsageError(f"--folds must be at least 2, got {folds}")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    choices = tuple(dict.fromkeys(choices))
    unknown = [f for f in choices if f not in families.FAMILIES]
    if unknown or not choices:
        raise UsageError(
            f"unknown model families {', '.join(unknown) or '(none)'}; "
            f"choose from: {', '.join(families.FAMILIES)}"
        )
    return choices


def _create_or_resume(storage, study_name: str, direction: str, settings: dict) -> optuna.Study:
    """Create the study, or resume it if it exists and was made for the same problem."""
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction=direction, load_if_exists=True
    )
    where = _study.mask(storage.url)
    if study.direction.name.lower() != direction:
        raise UsageError(
            f"study {study_name} in {where} is set to {study.direction.name.lower()}, not "
            f"{direction}; choose another --study-name"
        )
    existing = study.user_attrs
    for key, value in settings.items():
        previous = existing.get(SETTINGS_ATTR_PREFIX + key)
        if previous is not None and previous != value:
            raise UsageError(
                f"study {study_name} in {where} was made with {key}={previous!r}, not {value!r}; "
                "resume it with the same settings or choose another --study-name"
            )
    for key, value in settings.items():
        if SETTINGS_ATTR_PREFIX + key not in existing:
            study.set_user_attr(SETTINGS_ATTR_PREFIX + key, value)
    return study


def _conclude(study, job: StudyJob, model_name, X, splits, direction, already) -> TuneResult:
    """Summarise the study on the parent run, then refit, log and register the best trial."""
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    counts = {
        "complete": sum(t.state == states.COMPLETE for t in trials),
        "pruned": sum(t.state == states.PRUNED for t in trials),
        "failed": sum(t.state == states.FAIL for t in trials),
        "added": sum(t.state.is_finished() for t in trials) - already,
    }
    mlflow.log_metrics({f"n_trials_{k}": v for k, v in counts.items()})
    if not counts["complete"]:
        raise StageflowError(
            f"no trial of study {job.study_name} completed ({counts['pruned']} pruned, "
            f"{counts['failed']} failed); the trial runs' stageflow.error tags say why"
        )
    best = study.best_trial
    family, params = estimator_params(best.params)
    mlflow.set_tags({"stageflow.family": family, "optuna.best_trial": str(best.number)})
    tracking.log_params(
        {
            "family": family,
            "best_trial": best.number,
            **{f"model.{k}": v for k, v in params.items()},
        }
    )
    mlflow.log_metric(f"best_cv_{job.metric}", best.value)
    for file_name, fig in figures(study, best, job.metric).items():
        mlflow.log_figure(fig, f"{PLOTS_DIR}/{file_name}")
        plt.close(fig)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRIALS_CSV).name
        trials_frame(study).to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=PLOTS_DIR)

    logger.info("refitting the best trial (%d: %s) on the training split", best.number, family)
    pipeline = families.build(family, job.task, X, job.seed, params)
    pipeline.fit(splits.X_train, splits.y_train)
    scores = artifacts.log_evaluation(pipeline, splits, job.task, job.seed)
    info = artifacts.log_pipeline(
        pipeline,
        splits,
        job.task,
        model_name,
        date_formats=job.plan.dates if job.plan else None,
        ignored_columns=job.plan.ignored if job.plan else (),
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {
        "stageflow.task": job.task,
        "stageflow.family": family,
        "stageflow.kind": TUNE_KIND,
        STUDY_TAG: job.study_name,
        "optuna.best_trial": str(best.number),
    }.items():
        client.set_model_version_tag(model_name, version, key, value)
    test_value = scores.get(f"test_{job.metric}", float("nan"))
    client.update_model_version(
        model_name,
        version,
        description=(
            f"{families.FAMILY_NAMES[family]} tuned on {job.source} (study {job.study_name}, "
            f"best of {counts['complete']} trials: trial {best.number}, cv {job.metric} "
            f"{best.value:.4f}); test {job.metric} {test_value:.4f}"
        ),
    )
    return TuneResult(
        parent_run_id=job.parent_run_id,
        best_trial=best.number,
        best_value=round(float(best.value), 6),
        model_name=model_name,
        version=version,
        study_name=job.study_name,
        storage="",
        metric=job.metric,
        direction=direction,
        best_params={FAMILY_PARAM: family, **params},
        trials=counts,
        test_metrics={
            k.removeprefix("test_"): round(v, 6) for k, v in scores.items() if k.startswith("test_")
        },
        experiment_id=job.experiment_id,
    )
