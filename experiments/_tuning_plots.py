"""The study's pictures for the parent run: history, importances, slices; and its trials as CSV.

Optuna's matplotlib plots (not plotly) so they are PNGs the MLflow UI shows inline.
A plot that cannot be drawn yet (too few finished trials of the best family) is
skipped with a log line, never an error: the study's result does not depend on it.
"""

from __future__ import annotations

import logging
import warnings

import matplotlib.pyplot as plt
import optuna
from optuna.visualization import matplotlib as optuna_plots

from experiments._objective import FAMILY_PARAM

logger = logging.getLogger(__name__)

HISTORY = "optimization_history.png"
IMPORTANCES = "param_importances.png"
SLICES = "slice.png"


def figures(study: optuna.Study, best: optuna.trial.FrozenTrial, metric: str) -> dict:
    """Figures keyed by file name.

    Importances and slices are drawn over the best family's parameters, so each
    uses the trials that have them (conditional parameters exist only in their family).
    """
    family_params = [p for p in best.params if p != FAMILY_PARAM]
    draw = {
        HISTORY: lambda: optuna_plots.plot_optimization_history(study, target_name=metric),
        IMPORTANCES: lambda: optuna_plots.plot_param_importances(
            study, params=family_params or None, target_name=metric
        ),
        SLICES: lambda: optuna_plots.plot_slice(
            study, params=[FAMILY_PARAM, *family_params], target_name=metric
        ),
    }
    out = {}
    for name, plot in draw.items():
        try:
            with warnings.catch_warnings():
                # Optuna's matplotlib API is "experimental"; slices trip tight_layout's warning.
                warnings.simplefilter("ignore")
                axes = plot()
                first = axes.flat[0] if hasattr(axes, "flat") else axes
                fig = first.figure
                fig.set_size_inches(max(6.0, fig.get_size_inches()[0]), 4.5)
                fig.tight_layout()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("skipping %s: %s", name, exc)
            plt.close("all")
            continue
        out[name] = fig
    return out


def trials_frame(study: optuna.Study):
    """Every trial of the study: number, state, value, timings and params (``params_NAME``)."""
    return study.trials_dataframe(
        attrs=(
            "number",
            "state",
            "value",
            "datetime_start",
            "datetime_complete",
            "duration",
            "params",
        )
    )
