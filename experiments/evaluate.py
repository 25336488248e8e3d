"""Metrics and the plots MLflow shows for one trained pipeline."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots go to files, never to a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import font_manager
from sklearn import metrics
from sklearn.inspection import permutation_importance

from stageflow.catalog import CLASSIFICATION, PRIMARY_METRIC  # noqa: F401

# The metric each task is judged by, and whether bigger is better.
IMPORTANCE_MAX_ROWS = 2000


def score(model, X: pd.DataFrame, y: pd.Series, task: str) -> dict[str, float]:
    """Classification: accuracy, F1, ROC AUC, log loss. Regression: RMSE, MAE, R²."""
    predicted = model.predict(X)
    if task != CLASSIFICATION:
        return {
            "rmse": float(np.sqrt(metrics.mean_squared_error(y, predicted))),
            "mae": float(metrics.mean_absolute_error(y, predicted)),
            "r2": float(metrics.r2_score(y, predicted)),
        }
    classes = model.classes_
    binary = len(classes) == 2
    f1_options = {"average": "binary", "pos_label": classes[-1]} if binary else {"average": "macro"}
    result = {
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "f1": float(metrics.f1_score(y, predicted, **f1_options)),
    }
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(X)
        result["log_loss"] = float(metrics.log_loss(y, proba, labels=classes))
        if y.nunique() == len(classes):  # ROC AUC needs every class present
            result["roc_auc"] = float(
                metrics.roc_auc_score(y, proba[:, 1])
                if binary
                else metrics.roc_auc_score(y, proba, multi_class="ovr", labels=classes)
            )
    return result


@functools.cache
def font_families() -> list[str]:
    """Matplotlib's default font, then one with Hangul, so Korean column names render.

    DejaVu Sans has no Hangul (labels would be empty boxes); the NanumGothic font
    shipped by the ``koreanize-matplotlib`` package is registered as a per-glyph
    fallback without importing that package (its import rewrites global settings).
    """
    families = ["DejaVu Sans"]
    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is not None and spec.origin:
        font = Path(spec.origin).parent / "fonts" / "NanumGothic.ttf"
        if font.exists():
            font_manager.fontManager.addfont(str(font))
            families.append(font_manager.FontProperties(fname=str(font)).get_name())
    return families


def figures(model, X: pd.DataFrame, y: pd.Series, task: str, seed: int) -> dict[str, plt.Figure]:
    """Plots of the held-out split, keyed by artifact file name."""
    with plt.rc_context({"font.family": font_families()}):
        return _figures(model, X, y, task, seed)


def _figures(model, X: pd.DataFrame, y: pd.Series, task: str, seed: int) -> dict[str, plt.Figure]:
    figs = {}
    if task == CLASSIFICATION:
        fig, ax = plt.subplots(figsize=(6, 5))
        metrics.ConfusionMatrixDisplay.from_estimator(model, X, y, ax=ax, colorbar=False)
        ax.set_title("Confusion matrix (test split)")
        figs["confusion_matrix.png"] = fig
        if hasattr(model, "predict_proba"):
            figs["roc_curve.png"] = _roc(model, X, y)
    else:
        predicted = model.predict(X)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter(y, predicted, s=12, alpha=0.6)
        low, high = float(min(y.min(), predicted.min())), float(max(y.max(), predicted.max()))
        ax.plot([low, high], [low, high], "k--", linewidth=1, label="perfect")
        ax.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual (test split)")
        ax.legend()
        figs["predicted_vs_actual.png"] = fig
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter(predicted, y - predicted, s=12, alpha=0.6)
        ax.axhline(0, color="k", linestyle="--", linewidth=1)
        ax.set(xlabel="predicted", ylabel="residual (actual - predicted)", title="Residuals")
        figs["residuals.png"] = fig
    figs["feature_importance.png"] = _importance(model, X, y, seed)
    return figs


def _roc(model, X: pd.DataFrame, y: pd.Series) -> plt.Figure:
    proba = model.predict_proba(X)
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, label in enumerate(model.classes_):
        truth = (y == label).to_numpy()
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = metrics.roc_curve(truth, proba[:, i])
        ax.plot(fpr, tpr, label=f"{label} (AUC {metrics.auc(fpr, tpr):.3f})")
        if len(model.classes_) == 2:
            break  # one curve says it all for two classes
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test split)")
    ax.legend(fontsize="small")
    return fig


def _importance(model, X: pd.DataFrame, y: pd.Series, seed: int) -> plt.Figure:
    """Permutation importance on the raw input columns: works for every family."""
    if len(X) > IMPORTANCE_MAX_ROWS:
        X = X.sample(IMPORTANCE_MAX_ROWS, random_state=seed)
        y = y.loc[X.index]
    result = permutation_importance(model, X, y, n_repeats=5, random_state=seed, n_jobs=1)
    order = np.argsort(result.importances_mean)[-20:]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(order) + 1)))
    ax.barh(
        [str(X.columns[i]) for i in order],
        result.importances_mean[order],
        xerr=result.importances_std[order],
    )
    ax.set(xlabel="mean score drop when shuffled", title="Permutation feature importance")
    fig.tight_layout()
    return fig
