"""Model families: one scikit-learn pipeline each, with the preprocessing real tables need.

Every pipeline imputes missing values and one-hot encodes string categories
inside itself, so the model that is served takes the raw columns the user has.
"""

from __future__ import annotations

import ast

import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from experiments.features import CalendarFeatures
from stageflow.catalog import (  # noqa: F401 - re-exported for callers of `families`
    CLASSIFICATION,
    FAMILIES,
    FAMILY_NAMES,
    HGB,
    LR,
    RF,
)
from stageflow.errors import UsageError


def _estimator(family: str, task: str, seed: int) -> BaseEstimator:
    classify = task == CLASSIFICATION
    if family == LR:
        return LogisticRegression(max_iter=2000) if classify else LinearRegression()
    if family == RF:
        cls = RandomForestClassifier if classify else RandomForestRegressor
        return cls(n_estimators=100, random_state=seed)
    if family == HGB:
        cls = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return cls(random_state=seed)
    raise UsageError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")


def split_columns(X: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Numeric columns and categorical (string, categorical, boolean) columns.

    Date/time columns are neither: see :func:`date_columns`.
    """
    numeric = [
        c
        for c in X.columns
        if pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])
    ]
    dates = date_columns(X)
    categorical = [c for c in X.columns if c not in numeric and c not in dates]
    return numeric, categorical


def date_columns(X: pd.DataFrame) -> list[str]:
    """The datetime columns (the data check parses date strings into them)."""
    return [c for c in X.columns if pd.api.types.is_datetime64_any_dtype(X[c])]


def build(
    family: str, task: str, X: pd.DataFrame, seed: int, params: dict | None = None
) -> Pipeline:
    """The untrained pipeline for ``family`` on the columns of ``X``.

    Args:
        params: estimator hyperparameters, e.g. ``{"max_depth": 3}``; unknown names
            are refused with the list of valid ones.
    """
    estimator = _estimator(family, task, seed)
    if params:
        valid = estimator.get_params()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise UsageError(
                f"unknown parameter(s) {', '.join(unknown)} for {family}; "
                f"valid ones: {', '.join(sorted(valid))}"
            )
        try:
            estimator.set_params(**params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad parameter for {family}: {exc}") from None

    numeric, categorical = split_columns(X)
    dates = date_columns(X)
    numeric_steps = [("impute", SimpleImputer(strategy="median"))]
    if family == LR:
        numeric_steps.append(("scale", StandardScaler()))
    transformers = []
    if numeric:
        transformers.append(("numeric", Pipeline(numeric_steps), numeric))
    if dates:
        # Calendar parts of each date, imputed (and scaled) like any number.
        date_steps = [("calendar", CalendarFeatures())] + [
            (name, step.__class__(**step.get_params())) for name, step in numeric_steps
        ]
        transformers.append(("dates", Pipeline(date_steps), dates))
    if categorical:
        categorical_steps = Pipeline(
            [
                ("impute", SimpleImputer(strategy="most_frequent")),
                (
                    "onehot",
                    OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                ),
            ]
        )
        transformers.append(("categorical", categorical_steps, categorical))
    preprocess = ColumnTransformer(transformers, remainder="drop")
    return Pipeline([("preprocess", preprocess), ("model", estimator)])


def parse_params(pairs: list[str] | None) -> dict:
    """``["max_depth=3", "loss=log_loss"]`` → ``{"max_depth": 3, "loss": "log_loss"}``.

    Values are read as Python literals (numbers, True/False/None, quoted strings);
    anything else stays a string.
    """
    params = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {pair!r} is not KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        params[key.strip()] = value
    return params
