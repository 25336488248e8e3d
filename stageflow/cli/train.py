"""``stageflow train`` and ``stageflow tune``: learn from data, register a version."""

from __future__ import annotations

import argparse

from stageflow import catalog
from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_json,
    add_tracking,
    emit,
    formatter,
    optional_positive_float,
    positive_int,
    require_server_first,
)


def add_data(parser: argparse.ArgumentParser) -> None:
    """What train and tune learn from, and the model they register."""
    parser.add_argument(
        "--data", required=True, metavar="SOURCE", help="builtin:NAME or a .csv / .parquet path"
    )
    parser.add_argument("--target", required=True, metavar="COLUMN", help="the column to predict")
    parser.add_argument(
        "--model-name", metavar="NAME", help="registered model (default: data set name)"
    )


def add_data_check(parser: argparse.ArgumentParser) -> None:
    """The data check's overrides (README, "What Stageflow checks before training")."""
    parser.add_argument(
        "--id-column",
        action="append",
        default=[],
        metavar="C",
        help="an identifier column: dropped from the features, accepted and ignored in "
        "requests (repeatable; id-like columns are also found on their own)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse the data (exit 2) when the data check finds leakage or too-small classes",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What train and tune share after their own options: task, experiment, data check,
    tracking server and output."""
    parser.add_argument(
        "--task",
        choices=catalog.TASKS,
        help="override the detected task (classification/regression)",
    )
    parser.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: model name)"
    )
    add_data_check(parser)
    add_tracking(parser)
    add_json(parser)


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train one model, log it and register a new version",
        formatter_class=formatter,
        description=(
            "Train a scikit-learn pipeline (imputation and one-hot encoding inside) on a data "
            "source, log params, metrics, plots, data lineage and the model to MLflow, and "
            "register a new version of --model-name.\n\n"
            f"Built-in data sets: {', '.join(f'builtin:{n}' for n in sorted(catalog.BUILTINS))} "
            "(target column: target).\n\n"
            "Example:\n"
            "  stageflow train --data builtin:diabetes --target target --family hgb "
            "--param max_depth=3"
        ),
        epilog=EPILOG_TRACKING,
    )
    train.set_defaults(handler=run_train)
    add_data(train)
    train.add_argument(
        "--family",
        choices=catalog.FAMILIES,
        default="hgb",
        help="lr: logistic/linear; rf: random forest; hgb: histogram gradient boosting (default)",
    )
    train.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="estimator hyperparameter, repeatable (e.g. --param max_depth=3)",
    )
    train.add_argument("--seed", type=int, default=42, help="split and model seed (default 42)")
    add_run_options(train)

    tune = commands.add_parser(
        "tune",
        help="search hyperparameters with Optuna; register the best as a new version",
        formatter_class=formatter,
        description=(
            "Run an Optuna study over the model families (TPE with a seed, median pruning on "
            "cross-validation folds). One parent MLflow run per call holds the study's settings, "
            "best params, plots and trials.csv; every trial is a nested run named trial-N with "
            "its params, fold metrics and state. The best trial is refit, evaluated and logged "
            "like `train` and registered as a new version of --model-name.\n\n"
            "Studies live in SQLite under $STAGEFLOW_HOME (default ./.stageflow/optuna.db); "
            "--storage postgresql://USER@HOST/DB lets workers on several machines share one. "
            "The same --study-name and --storage resume a study and add trials. Keep passwords "
            "out of URIs (use PGPASSWORD or ~/.pgpass); Stageflow masks any it is given.\n\n"
            "Examples:\n"
            "  stageflow tune --data builtin:breast_cancer --target target --model-name cancer "
            "--n-trials 40 --workers 2\n"
            "  stageflow tune --data churn.csv --target churned --n-trials 200 --workers 4 \\\n"
            "      --storage postgresql://optuna@db.internal/studies --study-name churn-v3\n"
            "  # on another machine, the same command adds its workers to churn-v3"
        ),
        epilog=EPILOG_TRACKING,
    )
    tune.set_defaults(handler=run_tune)
    add_data(tune)
    tune.add_argument(
        "--n-trials", required=True, type=positive_int, metavar="N", help="trials to add"
    )
    tune.add_argument(
        "--workers", type=positive_int, default=1, metavar="K", help="processes (default 1)"
    )
    tune.add_argument(
        "--storage", metavar="URI", help="sqlite:///PATH or postgresql://USER@HOST/DB"
    )
    tune.add_argument(
        "--study-name", metavar="NAME", help="resume this study (default: a new one per call)"
    )
    tune.add_argument(
        "--timeout",
        type=optional_positive_float,
        metavar="SECONDS",
        help="stop starting trials after this long",
    )
    tune.add_argument(
        "--families",
        default=",".join(catalog.FAMILIES),
        metavar="LIST",
        help=f"comma-separated families to search (default {','.join(catalog.FAMILIES)})",
    )
    tune.add_argument(
        "--metric",
        metavar="NAME",
        help="optimise this (classification: accuracy, f1, roc_auc, log_loss; "
        "regression: rmse, mae, r2; default accuracy / rmse)",
    )
    tune.add_argument(
        "--folds", type=positive_int, default=3, metavar="K", help="CV folds (default 3)"
    )
    tune.add_argument("--seed", type=int, default=42, help="split and sampler seed (default 42)")
    add_run_options(tune)


def run_train(args) -> int:
    require_server_first(args)
    from experiments import families  # noqa: PLC0415
    from experiments.train import train  # noqa: PLC0415

    result = train(
        args.data,
        args.target,
        model_name=args.model_name,
        family=args.family,
        params=families.parse_params(args.param),
        seed=args.seed,
        task=args.task,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        id_columns=[c for c in args.id_column if c],  # MLproject passes "" for none
        strict=args.strict,
    )
    test = {k.removeprefix("test_"): v for k, v in result.metrics.items() if k.startswith("test_")}
    lines = [
        f"trained {result.family} ({result.task}) on {args.data}",
        f"  {result.data_check_summary}",
        "  test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()),
        f"registered {result.model_name} version {result.version}",
        f"  run: {result.run_url}",
        f"  next: stageflow promote --model {result.model_name} --version {result.version} "
        "--to Staging --reason '...'",
    ]
    emit(args, result.to_json(), "\n".join(lines))
    return 0


def run_tune(args) -> int:
    from experiments.tune import tune  # noqa: PLC0415

    result = tune(
        args.data,
        args.target,
        args.n_trials,
        model_name=args.model_name or None,
        workers=args.workers,
        storage=args.storage or None,
        study_name=args.study_name or None,
        timeout=args.timeout,
        metric=args.metric or None,
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
        folds=args.folds,
        seed=args.seed,
        task=args.task,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        progress=not args.json,
        # Nothing has run in this process yet (no threads, databases or OpenMP), so its
        # workers can be forked instead of spawned: seconds sooner at work.
        worker_start="fork",
        id_columns=[c for c in args.id_column if c],  # MLproject passes "" for none
        strict=args.strict,
    )
    t = result.trials
    lines = [
        f"study {result.study_name} in {result.storage}: {t['added']} trial(s) added "
        f"({t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed in all)",
        f"  {result.data_check_summary}",
        f"  best: trial {result.best_trial}, cv {result.metric} {result.best_value:.4f}, "
        + ", ".join(f"{k}={v}" for k, v in result.best_params.items()),
        "  test " + ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items()),
        f"registered {result.model_name} version {result.version}",
        f"  run: {result.run_url}",
        f"  more trials: stageflow tune --data {args.data} --target {args.target} "
        f"--model-name {result.model_name} --study-name {result.study_name} --n-trials N"
        + (f" --storage '{result.storage}'" if args.storage else ""),
        f"  next: stageflow promote --model {result.model_name} --version {result.version} "
        "--to Staging --reason '...'",
    ]
    emit(args, result.to_json(), "\n".join(lines))
    return 0
