"""What a trial tries and how it is scored: a conditional search space and cross-validation.

Each family's hyperparameters are named ``FAMILY.NAME`` (``rf.max_depth``), so a
parameter exists only in the trials of its family: Optuna sees a conditional search
space, and the refit passes ``NAME`` straight to :func:`experiments.families.build`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from experiments import evaluate, families
from stageflow.catalog import CLASSIFICATION, HGB, LR, REGRESSION, RF
from stageflow.errors import UsageError

MAXIMIZE, MINIMIZE = "maximize", "minimize"
# The metrics a study can optimise, per task, and which way is better.
METRICS = {
    CLASSIFICATION: {
        "accuracy": MAXIMIZE,
        "f1": MAXIMIZE,
        "roc_auc": MAXIMIZE,
        "log_loss": MINIMIZE,
    },
    REGRESSION: {"rmse": MINIMIZE, "mae": MINIMIZE, "r2": MAXIMIZE},
}
FAMILY_PARAM = "family"


def choose_metric(task: str, metric: str | None) -> tuple[str, str]:
    """The metric to optimise (default: the task's primary metric) and its direction.

    Raises:
        UsageError: the metric does not apply to the task.
    """
    metric = metric or evaluate.PRIMARY_METRIC[task][0]
    if metric not in METRICS[task]:
        raise UsageError(
            f"metric {metric!r} does not apply to {task}; choose one of: {', '.join(METRICS[task])}"
        )
    return metric, METRICS[task][metric]


def suggest(trial: optuna.Trial, task: str, choices: tuple[str, ...]) -> tuple[str, dict]:
    """A family, then that family's hyperparameters (names without the family prefix)."""
    family = trial.suggest_categorical(FAMILY_PARAM, list(choices))
    if family == LR:
        if task == CLASSIFICATION:
            return family, {"C": trial.suggest_float("lr.C", 1e-4, 1e2, log=True)}
        return family, {
            "fit_intercept": trial.suggest_categorical("lr.fit_intercept", [True, False])
        }
    if family == RF:
        return family, {
            "n_estimators": trial.suggest_int("rf.n_estimators", 25, 200, step=25),
            "max_depth": trial.suggest_int("rf.max_depth", 2, 16, log=True),
            "min_samples_leaf": trial.suggest_int("rf.min_samples_leaf", 1, 10),
            "max_features": trial.suggest_categorical("rf.max_features", ["sqrt", "log2", 1.0]),
        }
    if family == HGB:
        return family, {
            "learning_rate": trial.suggest_float("hgb.learning_rate", 0.01, 0.3, log=True),
            "max_iter": trial.suggest_int("hgb.max_iter", 50, 300, step=50),
            "max_leaf_nodes": trial.suggest_int("hgb.max_leaf_nodes", 8, 64, log=True),
            "min_samples_leaf": trial.suggest_int("hgb.min_samples_leaf", 5, 50),
            "l2_regularization": trial.suggest_float("hgb.l2_regularization", 1e-8, 1.0, log=True),
        }
    raise UsageError(
        f"unknown model family {family!r}; choose from: {', '.join(families.FAMILIES)}"
    )


def estimator_params(params: dict) -> tuple[str, dict]:
    """A trial's params → (family, the hyperparameters ``families.build`` takes)."""
    family = params[FAMILY_PARAM]
    prefix = f"{family}."
    return family, {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}


@dataclass
class FoldScores:
    """What one trial measured, fold by fold (filled as it goes, so a pruned trial has some)."""

    folds: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """``cv_METRIC_mean`` and ``cv_METRIC_std`` over the folds done."""
        out = {}
        names = sorted({name for fold in self.folds for name in fold})
        for name in names:
            values = [fold[name] for fold in self.folds if name in fold]
            out[f"cv_{name}_mean"] = float(np.mean(values))
            out[f"cv_{name}_std"] = float(np.std(values))
        return out


class CrossValidation:
    """The objective: k-fold cross-validation on the training split, reported fold by fold.

    After each fold the running mean is reported to Optuna, so the median pruner can
    stop a trial whose first folds are already worse than the median of earlier trials.
    """

    def __init__(
        self,
        X: pd.DataFrame,
        y: pd.Series,
        task: str,
        metric: str,
        choices: tuple[str, ...],
        folds: int,
        seed: int,
    ):
        self.X, self.y, self.task, self.metric = X, y, task, metric
        self.choices, self.seed = choices, seed
        stratify = task == CLASSIFICATION and y.value_counts().min() >= folds
        splitter = (StratifiedKFold if stratify else KFold)(folds, shuffle=True, random_state=seed)
        self.splits = list(splitter.split(X, y))

    def __call__(self, trial: optuna.Trial, scores: FoldScores) -> float:
        family, params = suggest(trial, self.task, self.choices)
        for step, (fit_rows, score_rows) in enumerate(self.splits):
            model = families.build(family, self.task, self.X, self.seed, params)
            model.fit(self.X.iloc[fit_rows], self.y.iloc[fit_rows])
            fold = evaluate.score(
                model, self.X.iloc[score_rows], self.y.iloc[score_rows], self.task
            )
            scores.folds.append(fold)
            running = float(np.mean([f[self.metric] for f in scores.folds if self.metric in f]))
            if not math.isfinite(running):
                raise ValueError(f"{self.metric} is {running} on fold {step}")
            trial.report(running, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.metric} {running:.4f} after fold {step + 1}")
        return running
