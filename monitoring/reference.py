"""The reference distributions a version is compared against, learned when it is trained.

A reference describes, per input column, what training saw -- numeric columns as
quantile bin edges with the count in each bin (the bins PSI is computed on) and a
finer quantile grid (the CDF the KS test compares with), categorical columns as
category counts, both with their missing count -- and the same for the model's
predictions on the validation split. It is a small JSON document kept inside the
model (``artifacts/reference.json``), so monitoring never needs the training data.

Versions logged before references existed get one computed from their run's test
split (``data/test.parquet``) and the model's predictions on it; the report says so.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

REFERENCE_VERSION = 1
# The key under which the model keeps it: MLflow stores it as artifacts/reference.json.
ARTIFACT_KEY = "reference"
FILE_NAME = "reference.json"
NUMERIC, CATEGORICAL, DATE = "numeric", "categorical", "date"
BINS = 10  # PSI bins: deciles of the reference
QUANTILES = 101  # the reference CDF for the KS test: percentiles 0..100
PREDICTION = "prediction"
FROM_TRAINING = "training"
FROM_TEST_SPLIT = "test split"


def kind_of(values: pd.Series) -> str:
    """numeric, categorical or date -- how a column is described and tested."""
    if pd.api.types.is_bool_dtype(values):
        return CATEGORICAL
    if pd.api.types.is_numeric_dtype(values):
        return NUMERIC
    if pd.api.types.is_datetime64_any_dtype(values):
        return DATE
    return CATEGORICAL


def describe(values: pd.Series, kind: str | None = None) -> dict:
    """One column's reference: bins and quantiles (numeric) or category counts."""
    kind = kind or kind_of(values)
    present = values.dropna()
    spec = {"kind": kind, "rows": int(len(values)), "missing": int(len(values) - len(present))}
    if kind == NUMERIC:
        x = present.to_numpy(dtype=float)
        if len(x):
            # Inner edges only (the outer bins are open), de-duplicated so a column with
            # few distinct values keeps one bin per value instead of empty slivers.
            inner = np.unique(np.quantile(x, np.linspace(0, 1, BINS + 1))[1:-1])
            spec["edges"] = inner.tolist()
            spec["counts"] = bin_counts(inner, x).tolist()
            spec["quantiles"] = np.quantile(x, np.linspace(0, 1, QUANTILES)).tolist()
        else:
            spec["edges"], spec["counts"], spec["quantiles"] = [], [0], []
    elif kind == CATEGORICAL:
        counts = present.astype(str).value_counts()
        spec["frequencies"] = {str(k): int(v) for k, v in counts.items()}
    return spec


def bin_counts(edges, x: np.ndarray) -> np.ndarray:
    """How many of the (present) values ``x`` fall in each bin the inner ``edges`` make.

    Bin ``i`` holds ``edges[i-1] <= x < edges[i]`` (open at both ends). Counted as the
    differences of ``(x < edge).sum()``: with a handful of edges that is ~4x faster than
    ``searchsorted`` on every value, which is the monitor's inner loop.
    """
    below = [int(np.count_nonzero(x < edge)) for edge in edges]
    return np.diff(np.array([0, *below, len(x)], dtype=np.int64))


def build(
    X: pd.DataFrame, predictions, task: str, source: str = FROM_TRAINING, note: str = ""
) -> dict:
    """The reference of a model: its input columns and its predictions.

    Args:
        X: the rows the input columns are described from (the training split).
        predictions: the model's answers on the validation split (class labels or values).
        task: ``classification`` or ``regression``.
        source: where the figures come from (:data:`FROM_TRAINING` or
            :data:`FROM_TEST_SPLIT`), named in the monitor's report.
    """
    predicted = pd.Series(np.asarray(predictions))
    return {
        "version": REFERENCE_VERSION,
        "task": task,
        "source": source,
        "note": note,
        "columns": {str(name): describe(X[name]) for name in X.columns},
        PREDICTION: describe(
            predicted.astype(str) if task == "classification" else predicted.astype(float),
            CATEGORICAL if task == "classification" else NUMERIC,
        ),
    }


def for_pipeline(pipeline, splits, task: str) -> dict:
    """The reference training logs with a version: training inputs, validation predictions."""
    return build(splits.X_train, pipeline.predict(splits.X_val), task)


def write(reference: dict, folder: str | Path) -> Path:
    path = Path(folder) / FILE_NAME
    path.write_text(json.dumps(reference, ensure_ascii=False))
    return path


def load(client, model: str, version: str) -> dict:
    """The reference of ``model`` version ``version``: the model's own, else from its test split.

    Both are read from the version's verified local copy (``stageflow.manifest``), as
    every load of a model is: a reference changed in the store is refused, never used.

    Raises:
        TamperedVersion: the version's files differ from its manifest.
        StageflowError: the version has neither a reference nor a test split.
    """
    import mlflow  # noqa: PLC0415 - keeps the statistics importable without MLflow's import cost

    from stageflow import manifest  # noqa: PLC0415
    from stageflow.errors import StageflowError  # noqa: PLC0415

    local = manifest.local_copy(model, version, client, seal=False)
    try:
        return json.loads((local / "artifacts" / FILE_NAME).read_text())
    except (OSError, ValueError) as exc:
        logger.info(
            "%s v%s has no stored reference (%s); using its test split", model, version, exc
        )
    mv = client.get_model_version(model, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return from_test_split(client, mv.run_id, local, tmp)
        except (OSError, mlflow.exceptions.MlflowException) as exc:
            raise StageflowError(
                f"{model} version {version} has no reference distributions and its run "
                f"{mv.run_id} has no readable test split ({exc}); retrain it to monitor it"
            ) from None


def from_test_split(client, run_id: str, model_dir: Path, tmp: str) -> dict:
    """A reference for a version logged before references: its test split and the
    answers of the model in ``model_dir`` (its verified local copy)."""
    import mlflow  # noqa: PLC0415

    from stageflow import tracking  # noqa: PLC0415
    from stageflow.catalog import TEST_SPLIT_ARTIFACT  # noqa: PLC0415

    run = client.get_run(run_id)
    params = tracking.plain_params(run)  # unquoted: `mlflow run` logs its params quoted
    target = params.get("target", "target")
    task = run.data.tags.get("stageflow.task") or params.get("task", "regression")
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp
    )
    frame = pd.read_parquet(path)
    X = frame.drop(columns=[target], errors="ignore")
    predictions = mlflow.pyfunc.load_model(str(model_dir)).predict(X)
    return build(
        X,
        predictions,
        task,
        FROM_TEST_SPLIT,
        note=f"computed from the test split of run {run_id}: the version predates "
        "stored references",
    )
