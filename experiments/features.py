"""Features a pipeline derives from raw columns: calendar parts of dates and times.

The transformer lives inside the pipeline, so the served model still takes the
raw date column (issue 10). It is a small scikit-learn transformer of our own
because no stock one splits a date into its calendar parts; skops stores it by
its attributes (plain lists) and loads it only when the model's exact trusted
types name it (``stageflow.manifest.ALLOWED_TRUSTED_TYPES``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

# The parts of every date; "hour" is added for a column whose training values had times.
DATE_PARTS = ("year", "month", "day", "day_of_week")
TIME_PART = "hour"


def as_datetimes(values, date_format: str | None = None) -> pd.Series:
    """One column of dates (strings, Timestamps or datetime64) as naive datetime64; bad → NaT.

    Time-zone-aware values keep their wall-clock time: the calendar a row was
    recorded in is the one its features describe.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if not pd.api.types.is_datetime64_any_dtype(series):
        try:
            series = pd.to_datetime(series, errors="coerce", format=date_format)
        except (TypeError, ValueError):  # mixed time zones: compare them in UTC
            series = pd.to_datetime(series, errors="coerce", format=date_format, utc=True)
    if getattr(series.dt, "tz", None) is not None:
        series = series.dt.tz_localize(None)
    return series


class CalendarFeatures(TransformerMixin, BaseEstimator):
    """Date/time columns → year, month, day of month, day of week (and hour where present).

    Missing or unparseable dates become NaN features, for the imputer after it.

    Example:
        >>> CalendarFeatures().fit_transform(pd.DataFrame({"d": ["2012/01/01"]}))
        array([[2012.,    1.,    1.,    6.]])
    """

    def fit(self, X, y=None):
        frame = pd.DataFrame(X)
        self.columns_ = [str(c) for c in frame.columns]
        self.n_features_in_ = frame.shape[1]
        self.hours_ = []
        for column in frame.columns:
            dates = as_datetimes(frame[column]).dropna()
            self.hours_.append(bool((dates != dates.dt.normalize()).any()))
        return self

    def transform(self, X):
        frame = pd.DataFrame(X)
        blocks = []
        for position, has_hours in enumerate(self.hours_):
            dates = as_datetimes(frame.iloc[:, position])
            parts = DATE_PARTS + ((TIME_PART,) if has_hours else ())
            for part in parts:
                blocks.append(getattr(dates.dt, part).to_numpy(dtype=float, na_value=np.nan))
        return np.column_stack(blocks) if blocks else np.empty((len(frame), 0))

    def get_feature_names_out(self, input_features=None):
        names = []
        for column, has_hours in zip(self.columns_, self.hours_, strict=True):
            parts = DATE_PARTS + ((TIME_PART,) if has_hours else ())
            names += [f"{column}_{part}" for part in parts]
        return np.array(names, dtype=object)
