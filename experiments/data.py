"""Data sources: scikit-learn's bundled sets (``builtin:NAME``) and CSV/Parquet files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets
from sklearn.model_selection import train_test_split

from stageflow.catalog import (  # noqa: F401 - re-exported for callers of `data`
    BUILTIN_PREFIX,
    BUILTIN_TARGET,
    BUILTINS,
    CLASSIFICATION,
    REGRESSION,
    TASKS,
)
from stageflow.errors import UsageError
from stageflow.files import FILE_SUFFIXES

# A numeric target with at most this many distinct integer values is a class label.
MAX_CLASSES = 20


@dataclass
class Splits:
    """The deterministic train/validation/test split of one data source."""

    X_train: pd.DataFrame
    X_val: pd.DataFrame
    X_test: pd.DataFrame
    y_train: pd.Series
    y_val: pd.Series
    y_test: pd.Series

    def named(self) -> dict[str, tuple[pd.DataFrame, pd.Series]]:
        return {
            "train": (self.X_train, self.y_train),
            "validation": (self.X_val, self.y_val),
            "test": (self.X_test, self.y_test),
        }


def load(source: str) -> pd.DataFrame:
    """Read ``source`` into a DataFrame.

    Args:
        source: ``builtin:NAME`` (one of :data:`BUILTINS`; target column ``target``)
            or a path to a ``.csv`` or ``.parquet`` file.

    Raises:
        UsageError: unknown built-in, missing file, unsupported suffix, unreadable file.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise UsageError(
                f"unknown built-in data set {name!r}; choose one of: {', '.join(sorted(BUILTINS))}"
            )
        frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
        return frame.rename(columns={c: str(c) for c in frame.columns})
    path = Path(source)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(
            f"data source {source!r} is neither builtin:NAME nor a .csv or .parquet file"
        )
    if not path.is_file():
        raise UsageError(f"data file {source} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise UsageError(f"cannot read {source}: {exc}") from None


def prepare_features(X: pd.DataFrame) -> pd.DataFrame:
    """Integer feature columns become floats, so a client may send null for any number."""
    ints = [
        c
        for c in X.columns
        if pd.api.types.is_integer_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])
    ]
    return X.astype({c: "float64" for c in ints}) if ints else X


def detect_task(y: pd.Series) -> str:
    """Classification for strings, booleans and few distinct integers; regression otherwise."""
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return CLASSIFICATION
    values = y.dropna()
    is_integral = np.all(np.mod(values.to_numpy(dtype=float), 1) == 0)
    if is_integral and values.nunique() <= MAX_CLASSES:
        return CLASSIFICATION
    return REGRESSION


def features_and_target(
    frame: pd.DataFrame, target: str, task: str | None = None
) -> tuple[pd.DataFrame, pd.Series, str]:
    """Separate the target column and decide the task.

    Raises:
        UsageError: the target is missing (the message lists the columns), empty, or the
            task cannot apply to it.
    """
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns))
        raise UsageError(f"target column {target!r} is not in the data; its columns are: {columns}")
    frame = frame[frame[target].notna()]
    if frame.empty:
        raise UsageError(f"target column {target!r} has no values")
    if frame.shape[1] < 2:
        raise UsageError("the data has no feature columns besides the target")
    y = frame[target]
    X = frame.drop(columns=[target])
    task = task or detect_task(y)
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if task == REGRESSION and not pd.api.types.is_numeric_dtype(y):
        raise UsageError(f"regression needs a numeric target; {target!r} is {y.dtype}")
    if task == CLASSIFICATION and y.nunique() < 2:
        raise UsageError(f"classification needs at least two classes in {target!r}")
    return X, y, task


def split(
    X: pd.DataFrame, y: pd.Series, task: str, seed: int, val_size=0.15, test_size=0.2
) -> Splits:
    """Deterministic train/validation/test split; stratified for classification where possible."""
    stratify = y if task == CLASSIFICATION and y.value_counts().min() >= 3 else None
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=stratify
    )
    stratify_rest = y_rest if stratify is not None else None
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest,
        y_rest,
        test_size=val_size / (1 - test_size),
        random_state=seed,
        stratify=stratify_rest,
    )
    return Splits(X_train, X_val, X_test, y_train, y_val, y_test)


def digest(frame: pd.DataFrame) -> str:
    """A content digest of a frame: same rows, columns and values give the same digest."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    h = hashlib.sha256(hashed.tobytes())
    h.update("\x1f".join(map(str, frame.columns)).encode())
    return h.hexdigest()[:16]
