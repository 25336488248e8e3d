"""The model Stageflow registers: a scikit-learn pipeline behind a data contract.

This file is an MLflow "model from code": ``mlflow.pyfunc.log_model`` copies it
into the model, and loading the model runs it, so it imports nothing of
Stageflow's and no class is pickled. The pipeline is stored with skops and
loaded with exactly the types it was logged with; the contract is a JSON file
learned from the training split:

- per column: numeric, categorical or datetime, its type, whether training saw
  missing values, the observed range (numeric), the categories seen
  (categorical), or the format its training strings had (datetime: any date
  parses, later ones included; text that is no date is ``wrong_type``);
- ``ignored_columns``: columns training dropped (identifiers, constants) that a
  request may still send; they are accepted and dropped before the checks. A
  ``model_config`` ``ignored_columns`` (a list, or names separated by commas)
  adds more at serve time;
- the target: the classes, or the observed range of a regression target.

Every request is checked against it before the pipeline runs, and every
prediction after. What fails answers with a short JSON error naming the row,
the column and the problem, never the payload::

    {"error_code": "INVALID_INPUT", "message": "row 0, column 'age': 912.0 is above ...",
     "column": "age", "problem": "above_range", "row": 0}

Inputs answer 400 (``INVALID_INPUT``); abnormal outputs answer 422
(``ABNORMAL_OUTPUT``). The policies (``model_config``, overridable at serve
time): ``unknown_category`` is ``reject`` or ``flag`` (accept, encode as unseen,
count), ``abnormal_output`` is ``reject`` or ``clip`` (regression only: clip
into range, count), ``on_invalid`` is ``fail`` (refuse the request at its first
bad row) or ``mark`` (batch scoring: answer a frame of ``prediction`` and
``guard_problem``; a refused row gets a null prediction and the problem it would
be refused for if sent alone). ``ignored_columns`` (a list, added to the contract's own)
names columns a request may carry that the model never sees, such as the
client's order number: accepted, dropped before the check.

Under ``stageflow serve`` the model_config also holds ``inference_log`` (model,
version, mode, ...): the model then records each request's checked arrays and
answer in Stageflow's inference log (``serving/inference_log.py``, imported only
then, from the serving environment). The log has the rows as the contract
checked them, so nothing is rebuilt from the DataFrame.

The model logs no input signature, so ``mlflow models serve`` does not enforce
a schema on top of the contract. When the pipeline has the shape Stageflow
builds (imputers, a scaler and a one-hot encoder in a ColumnTransformer), its
preprocessing runs as a few numpy operations on the checked columns instead of
through pandas: the fast path, proven equal to the pipeline on the training
split when the model is logged.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

logger = logging.getLogger("stageflow.guard")

CONTRACT_VERSION = 1
CLASSIFICATION, REGRESSION = "classification", "regression"
NUMERIC, CATEGORICAL, DATETIME = "numeric", "categorical", "datetime"
# Values more than this fraction of the training range's width outside it are refused:
# wide enough that a real outlier passes (drift is monitoring's job), narrow enough that
# a unit mix-up or a sentinel like 9999 does not.
RANGE_TOLERANCE = 1.0
PROBABILITY_TOLERANCE = 1e-6
# A column name an answer quotes is cut to this many characters (clients choose them).
NAME_CHARS = 64
POLICIES = {
    "unknown_category": ("reject", "flag"),
    "abnormal_output": ("reject", "clip"),
    # fail: a request is refused at its first bad row (serving). mark: every row is
    # answered, a refused one with a null prediction and its problem (batch scoring).
    "on_invalid": ("fail", "mark"),
}
DEFAULT_POLICY = {name: choices[0] for name, choices in POLICIES.items()}
# The columns ``on_invalid: mark`` answers with.
PREDICTION, GUARD_PROBLEM = "prediction", "guard_problem"
# Artifact keys of the logged model.
PIPELINE, CONTRACT = "pipeline", "contract"
# The model_config key (and contract key) naming columns a request may send and the model
# drops; the model_config key of the inference log's settings (serving/inference_log.py).
IGNORED_COLUMNS, INFERENCE_LOG = "ignored_columns", "inference_log"
# The model_config a version is logged with. MLflow lets a load-time model_config
# override only the keys logged here, so every key serving may set must be present.
LOGGED_CONFIG = {**DEFAULT_POLICY, IGNORED_COLUMNS: [], INFERENCE_LOG: None}


class Rejected(MlflowException):
    """A request the contract refuses: 400 with a short, stable JSON body.

    MLflow's scoring server rewrites the message of any MlflowException to quote
    the whole input; the body served is built here instead, from fixed fields.
    """

    status = 400
    code = "INVALID_INPUT"

    def __init__(self, column: str | None, problem: str, detail: str, row: int | None = None):
        if column is not None and len(column) > NAME_CHARS:  # a client's name: bounded
            column = column[: NAME_CHARS - 1] + "…"
        where = f"column {column!r}: " if column is not None else ""
        if row is not None:
            where = f"row {row}, {where}"
        super().__init__(where + detail, error_code=INVALID_PARAMETER_VALUE)
        self.body = {"error_code": self.code, "message": where + detail, "problem": problem}
        if column is not None:
            self.body["column"] = column
        if row is not None:
            self.body["row"] = row

    def serialize_as_json(self) -> str:
        return json.dumps(self.body, ensure_ascii=False)

    def get_http_status_code(self) -> int:
        return self.status

    def __str__(self) -> str:
        return self.body["message"]


class AbnormalOutput(Rejected):
    """A prediction outside what training makes plausible: 422, counted."""

    status = 422
    code = "ABNORMAL_OUTPUT"


# -- learning the contract (at training time) ----------------------------------------------


def learn_contract(
    X: pd.DataFrame,
    y: pd.Series,
    task: str,
    numeric_columns: list[str],
    trusted_types: list[str],
    *,
    date_formats: dict[str, str | None] | None = None,
    ignored_columns=(),
) -> dict:
    """The contract of a pipeline trained on ``X``/``y`` (JSON-ready).

    Args:
        date_formats: the strftime format each datetime column's training strings
            had (None: any), tried first when a request's dates are parsed.
        ignored_columns: columns a request may send that the model drops unchecked.
    """
    columns = []
    for name in X.columns:
        values = X[name]
        spec = {"name": str(name), "nullable": bool(values.isna().any())}
        present = values.dropna()
        if pd.api.types.is_datetime64_any_dtype(values):
            spec["kind"], spec["type"] = DATETIME, "datetime"
            spec["format"] = (date_formats or {}).get(str(name))
            # For the record (monitoring): later dates are accepted, never refused.
            spec["min"] = present.min().isoformat() if len(present) else None
            spec["max"] = present.max().isoformat() if len(present) else None
        elif name in numeric_columns:
            spec["kind"], spec["type"] = NUMERIC, "double"
            spec["min"] = float(present.min()) if len(present) else None
            spec["max"] = float(present.max()) if len(present) else None
        else:
            boolean = pd.api.types.is_bool_dtype(values) or (
                len(present) and all(isinstance(v, (bool, np.bool_)) for v in present)
            )
            spec["kind"], spec["type"] = CATEGORICAL, "boolean" if boolean else "string"
            categories = present.unique().tolist()
            spec["categories"] = sorted(bool(v) if boolean else str(v) for v in categories)
        columns.append(spec)
    if task == CLASSIFICATION:
        target = {"classes": sorted(y.unique().tolist())}
    else:
        target = {"min": float(y.min()), "max": float(y.max())}
    return {
        "version": CONTRACT_VERSION,
        "task": task,
        "columns": columns,
        IGNORED_COLUMNS: [str(c) for c in ignored_columns],
        "target": target,
        "range_tolerance": RANGE_TOLERANCE,
        "skops_trusted_types": list(trusted_types),
    }


def check_policy(config: dict | None) -> dict:
    """The policies in ``config`` (a model_config), defaults filled in, bad values refused."""
    policy = dict(DEFAULT_POLICY)
    for name, value in (config or {}).items():
        if name not in POLICIES:
            continue
        if value not in POLICIES[name]:
            raise MlflowException.invalid_parameter_value(
                f"model_config {name}={value!r}: choose one of {', '.join(POLICIES[name])}"
            )
        policy[name] = value
    return policy


# -- the guard ---------------------------------------------------------------------------


class Guard:
    """The contract, compiled for checking requests fast.

    Args:
        ignored: more columns to accept and drop, beside the contract's ``ignored_columns``
            (an id column): never refused as unexpected, never passed on.
    """

    def __init__(self, contract: dict, policy: dict, ignored=()):
        self.contract = contract
        self.policy = policy
        self.names = [c["name"] for c in contract["columns"]]
        self._known = set(self.names)
        self.ignored = (set(contract.get(IGNORED_COLUMNS, ())) | set(ignored)) - self._known
        self._index = pd.Index(self.names)
        self.numeric = [c for c in contract["columns"] if c["kind"] == NUMERIC]
        self.categorical = [c for c in contract["columns"] if c["kind"] == CATEGORICAL]
        self.dates = [c for c in contract["columns"] if c["kind"] == DATETIME]
        tolerance = contract["range_tolerance"]
        low, high = [], []
        for c in self.numeric:
            lo, hi = _widened(c["min"], c["max"], tolerance)
            low.append(lo)
            high.append(hi)
        self.low, self.high = np.array(low, dtype=float), np.array(high, dtype=float)
        self.nullable = np.array([c["nullable"] for c in self.numeric], dtype=bool)
        self.categories = [frozenset(c["categories"]) for c in self.categorical]
        self.numeric_names = [c["name"] for c in self.numeric]
        self.categorical_names = [c["name"] for c in self.categorical]
        self.date_names = [c["name"] for c in self.dates]
        # The columns `check` returns as object arrays, in order: categorical, then dates.
        self.object_names = self.categorical_names + self.date_names
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def check(self, frame: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray], int]:
        """The request's numeric columns as one float matrix and its other columns.

        Returns:
            ``(numeric, categorical, flagged)``: ``categorical`` holds one object
            array per name in ``object_names`` (the categorical columns, then the
            date columns as Timestamps); missing values are ``None``; ``flagged``
            lists the rows with an unknown category accepted under ``flag`` (a row
            once per such value).

        Raises:
            Rejected: naming the first row and column that breaks the contract.
        """
        if not frame.columns.equals(self._index):
            frame = self._reorder(frame, frame.columns.tolist())
        numeric = self._numeric(frame)
        if numeric.size:
            self._check_numeric(numeric)
        categorical, flagged = [], []
        for spec, allowed in zip(self.categorical, self.categories, strict=True):
            values, unknown = self._check_categorical(frame[spec["name"]].to_numpy(), spec, allowed)
            categorical.append(values)
            flagged += unknown
        for spec in self.dates:
            categorical.append(_check_datetime(frame[spec["name"]].to_numpy(), spec))
        return numeric, categorical, flagged

    def problems(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row, the problem :meth:`check` refuses it for when sent alone, or None.

        The mark mode's checks (``on_invalid: mark``), kept apart from :meth:`check`
        so the online path stays as it is. Checks run in :meth:`check`'s order, so
        a row with several faults reports the one a single-row request would.

        Raises:
            Rejected: for what concerns the whole request (a missing, unexpected or
                duplicate column), as :meth:`check` does.
        """
        if not frame.columns.equals(self._index):
            frame = self._reorder(frame, frame.columns.tolist())
        problems = np.full(len(frame), None, dtype=object)

        def mark(rows: np.ndarray, problem: str) -> None:
            problems[rows & _unmarked(problems)] = problem

        X = np.empty((len(frame), len(self.numeric)))
        for j, name in enumerate(self.numeric_names):
            values = frame[name].to_numpy()
            kind = values.dtype.kind
            if kind in "fiu":
                X[:, j] = values
                continue
            X[:, j] = np.nan
            if kind != "O":  # a whole column of the wrong kind: every row refused for it
                mark(np.ones(len(frame), dtype=bool), "wrong_type")
                continue
            for row, value in enumerate(values):
                value = _scalar(value)
                if value is None:
                    continue
                if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                    value, (bool, np.bool_)
                ):
                    X[row, j] = value
                elif problems[row] is None:
                    problems[row] = "wrong_type"
        if X.size:
            mark((np.isnan(X) & ~self.nullable).any(axis=1), "missing_value")
            mark(np.isinf(X).any(axis=1), "not_finite")
            mark((X < self.low).any(axis=1), "below_range")
            mark((X > self.high).any(axis=1), "above_range")
        reject_unknown = self.policy["unknown_category"] == "reject"
        for spec, allowed in zip(self.categorical, self.categories, strict=True):
            expected = (bool, np.bool_) if spec["type"] == "boolean" else str
            for row, value in enumerate(frame[spec["name"]].to_numpy()):
                if problems[row] is not None:
                    continue
                value = _scalar(value)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    if not spec["nullable"]:
                        problems[row] = "missing_value"
                elif not isinstance(value, expected) or (
                    expected is str and isinstance(value, bool)
                ):
                    problems[row] = "wrong_type"
                elif reject_unknown and value not in allowed:
                    problems[row] = "unknown_category"
        for spec in self.dates:
            values = frame[spec["name"]].to_numpy()
            try:
                _check_datetime(values, spec)
            except Rejected:  # some row is refused: find each (the column check stops at one)
                for row in np.flatnonzero(_unmarked(problems)):
                    try:
                        _check_datetime(values[row : row + 1], spec)
                    except Rejected as refused:
                        problems[row] = refused.body["problem"]
        return problems

    def count(self, what: str) -> int:
        with self._lock:
            self.counts[what] += 1
            return self.counts[what]

    def _reorder(self, frame: pd.DataFrame, columns: list) -> pd.DataFrame:
        present = set(columns)
        for name in self.names:
            if name not in present:
                raise Rejected(name, "missing_column", "missing; the model needs it")
        for name in columns:
            if name not in self._known and name not in self.ignored:
                raise Rejected(
                    str(name), "unexpected_column", "not a column the model was trained on"
                )
        if len(columns) != len(present):
            raise Rejected(None, "duplicate_column", "a column name appears twice")
        return frame[self.names]  # ignored columns dropped here

    def _numeric(self, frame: pd.DataFrame) -> np.ndarray:
        if not self.numeric:
            return np.empty((len(frame), 0))
        if not self.categorical and not self.dates:
            values = frame.to_numpy()  # all numbers: one float block, else objects
            if values.dtype.kind in "fiu":
                return values.astype(np.float64, copy=False)
        out = np.empty((len(frame), len(self.numeric)))
        for j, name in enumerate(self.numeric_names):
            values = frame[name].to_numpy()
            kind = values.dtype.kind
            if kind in "fiu":
                out[:, j] = values
            elif kind == "O":
                out[:, j] = _numbers_or_none(values, name)
            else:
                raise Rejected(name, "wrong_type", f"expected numbers, got {_type_name(values)}")
        return out

    def _check_numeric(self, X: np.ndarray) -> None:
        missing = np.isnan(X)
        if missing.any():
            refused = missing & ~self.nullable
            if refused.any():
                row, j = _first(refused)
                raise Rejected(
                    self.numeric_names[j],
                    "missing_value",
                    "missing (null or NaN), and training had no missing values there",
                    row,
                )
        infinite = np.isinf(X)
        if infinite.any():
            row, j = _first(infinite)
            raise Rejected(self.numeric_names[j], "not_finite", "infinite values are refused", row)
        for mask, problem, side in (
            (X < self.low, "below_range", "below"),
            (X > self.high, "above_range", "above"),
        ):
            if mask.any():
                row, j = _first(mask)
                spec = self.numeric[j]
                raise Rejected(
                    spec["name"],
                    problem,
                    f"{X[row, j]:.6g} is {side} the accepted range "
                    f"[{self.low[j]:.6g}, {self.high[j]:.6g}] (training saw "
                    f"{spec['min']:.6g} to {spec['max']:.6g})",
                    row,
                )

    def _check_categorical(
        self, values: np.ndarray, spec: dict, allowed: frozenset
    ) -> tuple[np.ndarray, list[int]]:
        name = spec["name"]
        expected = (bool, np.bool_) if spec["type"] == "boolean" else str
        out = np.empty(len(values), dtype=object)
        unknown = []
        for row, value in enumerate(values):
            value = _scalar(value)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                if not spec["nullable"]:
                    raise Rejected(
                        name,
                        "missing_value",
                        "missing (null), and training had no missing values there",
                        row,
                    )
                out[row] = None
                continue
            if not isinstance(value, expected) or (expected is str and isinstance(value, bool)):
                raise Rejected(
                    name,
                    "wrong_type",
                    f"expected {'true/false' if expected is not str else 'text'}, "
                    f"got {type(value).__name__}",
                    row,
                )
            if value not in allowed:
                if self.policy["unknown_category"] == "reject":
                    raise Rejected(
                        name,
                        "unknown_category",
                        f"a category not seen in training ({len(allowed)} known)",
                        row,
                    )
                unknown.append(row)
            out[row] = value
        return out, unknown


def _check_datetime(values: np.ndarray, spec: dict) -> np.ndarray:
    """A date column as Timestamps (None where missing), refusing what is not a date.

    Strings parse in the training format first, then as any date pandas reads
    (ISO 8601 and the like): a client need not know how the training file wrote
    its dates. Dates after the training period are accepted.
    """
    name = spec["name"]
    out = np.empty(len(values), dtype=object)
    if values.dtype.kind == "M":  # already datetime64 (a Parquet file in batch scoring)
        for row, value in enumerate(pd.DatetimeIndex(values)):
            out[row] = None if pd.isna(value) else value
        if not spec["nullable"] and any(v is None for v in out):
            row = next(r for r, v in enumerate(out) if v is None)
            raise Rejected(name, "missing_value", "missing (null), and training had none", row)
        return out
    texts = {}
    for row, value in enumerate(values):
        value = _scalar(value)
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
            if not spec["nullable"]:
                raise Rejected(
                    name, "missing_value", "missing (null), and training had no missing values", row
                )
            out[row] = None
        elif isinstance(value, pd.Timestamp):
            out[row] = value
        elif isinstance(value, str):
            texts[row] = value
        else:
            raise Rejected(
                name, "wrong_type", f"expected a date or time, got {type(value).__name__}", row
            )
    if texts:
        rows = list(texts)
        strings = pd.Series(list(texts.values()), dtype=object)
        try:
            parsed = list(pd.to_datetime(strings, format=spec.get("format"), errors="coerce"))
        except (TypeError, ValueError):  # e.g. mixed time zones: each value on its own
            parsed = [pd.NaT] * len(strings)
        parsed = [_any_date(t) if pd.isna(v) else v for t, v in zip(strings, parsed, strict=True)]
        for row, value in zip(rows, parsed, strict=True):
            if pd.isna(value):
                raise Rejected(
                    name,
                    "wrong_type",
                    "expected a date or time (e.g. 2024-01-31), got text that is not one",
                    row,
                )
            out[row] = value
    return out


def _any_date(text: str):
    try:
        value = pd.to_datetime(text, format="mixed")
    except (TypeError, ValueError, OverflowError):
        return pd.NaT
    return pd.NaT if value is None else value


def _widened(lo: float | None, hi: float | None, tolerance: float) -> tuple[float, float]:
    if lo is None or hi is None:  # never observed: any finite value
        return -np.inf, np.inf
    margin = tolerance * ((hi - lo) or max(abs(hi), 1.0))
    return lo - margin, hi + margin


def _unmarked(problems: np.ndarray) -> np.ndarray:
    return np.fromiter((p is None for p in problems), dtype=bool, count=len(problems))


def _first(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows[0]), int(cols[0])


def _numbers_or_none(values: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(len(values))
    for row, value in enumerate(values):
        value = _scalar(value)
        if value is None:
            out[row] = np.nan
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        ):
            out[row] = value
        else:
            raise Rejected(
                name, "wrong_type", f"expected a number, got {type(value).__name__}", row
            )
    return out


def _scalar(value):
    """A cell as a plain value: ``inputs`` given as records arrive as 0-d arrays."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _type_name(values: np.ndarray) -> str:
    return "true/false" if values.dtype.kind == "b" else str(values.dtype)


# -- the fast path -------------------------------------------------------------------------


class FastPreprocess:
    """The fitted ColumnTransformer of a Stageflow pipeline as numpy operations.

    Only the shapes Stageflow builds are compiled: per transformer, a
    SimpleImputer, then a StandardScaler (numeric) or a OneHotEncoder that
    ignores unknown categories (categorical). Anything else returns None from
    :meth:`compile` and the pipeline runs as it is.
    """

    def __init__(self, parts: list):
        self.parts = parts

    @classmethod
    def compile(cls, preprocess, guard: Guard) -> FastPreprocess | None:
        from sklearn.compose import ColumnTransformer  # noqa: PLC0415 - only where compiled
        from sklearn.impute import SimpleImputer  # noqa: PLC0415
        from sklearn.pipeline import Pipeline  # noqa: PLC0415
        from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: PLC0415

        if not isinstance(preprocess, ColumnTransformer) or preprocess.sparse_output_:
            return None
        parts = []
        for _, steps, columns in preprocess.transformers_:
            if steps == "drop" or len(columns) == 0:
                continue
            if not isinstance(steps, Pipeline) or not isinstance(columns, list):
                return None
            imputer, *rest = [step for _, step in steps.steps]
            if not isinstance(imputer, SimpleImputer) or imputer.add_indicator:
                return None
            if all(c in guard.numeric_names for c in columns):
                stats = np.asarray(imputer.statistics_, dtype=float)
                if np.isnan(stats).any() or len(rest) > 1:
                    return None
                mean = scale = None
                if rest:
                    scaler = rest[0]
                    if not isinstance(scaler, StandardScaler):
                        return None
                    mean, scale = scaler.mean_, scaler.scale_
                positions = [guard.numeric_names.index(c) for c in columns]
                parts.append((NUMERIC, positions, stats, mean, scale))
            elif all(c in guard.categorical_names for c in columns):
                if len(rest) != 1 or not isinstance(rest[0], OneHotEncoder):
                    return None
                encoder = rest[0]
                if (
                    encoder.handle_unknown != "ignore"
                    or encoder.drop_idx_ is not None
                    or getattr(encoder, "_infrequent_enabled", False)
                ):
                    return None
                positions = [guard.categorical_names.index(c) for c in columns]
                lookups = [{v: i for i, v in enumerate(cats)} for cats in encoder.categories_]
                widths = [len(cats) for cats in encoder.categories_]
                parts.append((CATEGORICAL, positions, list(imputer.statistics_), lookups, widths))
            else:
                return None
        return cls(parts)

    def transform(self, numeric: np.ndarray, categorical: list[np.ndarray]) -> np.ndarray:
        blocks = []
        for kind, positions, stats, a, b in self.parts:
            if kind == NUMERIC:
                X = numeric[:, positions]
                X = np.where(np.isnan(X), stats, X)
                if a is not None:
                    X = (X - a) / b
                blocks.append(X)
                continue
            n = len(numeric)
            out = np.zeros((n, sum(b)))
            offset = 0
            for position, fill, lookup, width in zip(positions, stats, a, b, strict=True):
                for row, value in enumerate(categorical[position]):
                    index = lookup.get(fill if value is None else value)
                    if index is not None:
                        out[row, offset + index] = 1.0
                offset += width
            blocks.append(out)
        return blocks[0] if len(blocks) == 1 else np.hstack(blocks)


# -- the model -----------------------------------------------------------------------------


class GuardedModel(mlflow.pyfunc.PythonModel):
    """A Stageflow pipeline behind its data contract (see the module docstring)."""

    contract: dict | None = None
    log = None  # the inference log (serving/inference_log.py) when serving with one

    def load_context(self, context) -> None:
        import skops.io  # noqa: PLC0415 - only where a model is loaded

        with open(context.artifacts[CONTRACT], encoding="utf-8") as f:
            contract = json.load(f)
        pipeline = skops.io.load(
            context.artifacts[PIPELINE], trusted=contract["skops_trusted_types"]
        )
        self.setup(pipeline, contract, context.model_config)

    def setup(self, pipeline, contract: dict, config: dict | None = None) -> GuardedModel:
        """Ready the model from its parts (``load_context`` does this from the artifacts)."""
        if contract.get("version") != CONTRACT_VERSION:
            raise MlflowException(f"unsupported data contract version {contract.get('version')}")
        self.pipeline, self.contract = pipeline, contract
        config = config or {}
        self.policy = check_policy(config)
        log_config = config.get(INFERENCE_LOG)
        self.id_column = (log_config or {}).get("id_column")
        ignored = config.get(IGNORED_COLUMNS) or ()
        if isinstance(ignored, str):
            ignored = [c.strip() for c in ignored.split(",") if c.strip()]
        ignored = [*ignored, *([self.id_column] if self.id_column else [])]
        self.guard = Guard(contract, self.policy, ignored)
        self.classify = contract["task"] == CLASSIFICATION
        self.estimator = pipeline[-1]
        self.fast = (
            FastPreprocess.compile(pipeline[0], self.guard)
            if contract.get("fast_path", True) and len(pipeline) == 2
            else None
        )
        self._linear_kind = _linear_kind(self.estimator) if self.fast is not None else None
        if not self.classify:
            self.low, self.high = _widened(
                contract["target"]["min"], contract["target"]["max"], contract["range_tolerance"]
            )
        if log_config:
            self._attach_log(log_config)
        return self

    def _attach_log(self, log_config: dict) -> None:
        try:
            from serving import inference_log  # noqa: PLC0415 - Stageflow's, only when serving
        except ImportError:
            logger.warning("stageflow guard: serving.inference_log is not importable; no log")
            return
        self.log = inference_log.attach(self.guard, self.classify, log_config)
        self._current_request = inference_log.current_request

    # The hint is one MLflow infers no schema from: the contract checks inputs, and the
    # scoring server parses requests as for any model without a signature.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        """Labels (classification) or values (regression) for the checked rows.

        ``model_input`` is what the scoring server parsed: a DataFrame, or a dict
        of columns (``inputs``/``instances``).
        """
        note = self._current_request() if self.log is not None else None
        if note is None:
            return self._predict(model_input, None)
        try:
            return self._predict(model_input, note)
        except Rejected as exc:
            note.refuse(exc.body["problem"], exc.body.get("row"))
            raise

    def _predict(self, model_input, note):
        frame = _as_frame(model_input)
        if self.policy["on_invalid"] == "mark":
            return self._predict_marked(frame)
        numeric, categorical, flagged = self.guard.check(frame)
        if flagged:
            total = self.guard.count("unknown_category")
            logger.warning(
                "stageflow guard: accepted %d unknown categories (flag policy); %d so far",
                len(flagged),
                total,
            )
        if not len(frame):
            return np.array([])
        scores = self._scores(numeric, categorical, frame)
        answer = self._classes(scores) if self.classify else self._values(scores, note)
        if note is not None:
            # References only: the log's writer thread builds its table from these.
            note.numeric, note.categorical, note.predictions = numeric, categorical, answer
            if self.id_column is not None and self.id_column in frame.columns:
                note.ids = frame[self.id_column].to_numpy()
            if flagged:
                note.problems = note.problems if note.problems is not None else _no_problems(frame)
                note.problems[flagged] = "unknown_category"
        return answer

    def _predict_marked(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``on_invalid: mark``: every row answered; a refused one null, with its problem.

        The accepted rows go through the same check and scoring as a request; an
        abnormal output marks its row as the online path would refuse it.
        """
        problems = self.guard.problems(frame)
        accepted = np.flatnonzero(_unmarked(problems))
        predictions = None
        if len(accepted):
            rows = frame.iloc[accepted]
            numeric, categorical, _ = self.guard.check(rows)
            scores = self._scores(numeric, categorical, rows)
            predictions, output_problems = (
                self._marked_classes(scores) if self.classify else self._marked_values(scores)
            )
            problems[accepted] = output_problems
        refused = len(frame) - int(_unmarked(problems).sum())
        if refused:
            total = self.guard.count("marked")
            logger.warning(
                "stageflow guard: marked %d of %d rows refused; %d batches so far",
                refused,
                len(frame),
                total,
            )
        return pd.DataFrame(
            {
                PREDICTION: self._nullable(predictions, accepted, problems, len(frame)),
                GUARD_PROBLEM: pd.array(problems, dtype="string"),
            },
            index=frame.index,
        )

    def _marked_classes(self, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        problems = np.full(len(proba), None, dtype=object)
        finite = np.isfinite(proba).all(axis=1)
        problems[~finite] = "not_finite"
        safe = np.where(finite[:, None], proba, 0.0)
        invalid = finite & (
            (np.abs(safe.sum(axis=1) - 1.0) > PROBABILITY_TOLERANCE) | (safe < 0).any(axis=1)
        )
        problems[invalid] = "invalid_probabilities"
        return self.estimator.classes_[safe.argmax(axis=1)], problems

    def _marked_values(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(values, dtype=float)
        problems = np.full(len(values), None, dtype=object)
        finite = np.isfinite(values)
        problems[~finite] = "not_finite"
        outside = finite & ((values < self.low) | (values > self.high))
        if self.policy["abnormal_output"] == "clip":
            values = np.where(outside, np.clip(values, self.low, self.high), values)
        else:
            problems[outside] = "out_of_range"
        return values, problems

    def _nullable(self, predictions, accepted, problems, rows: int):
        """The prediction column with a null wherever ``problems`` names one."""
        keep = _unmarked(problems)
        if not self.classify:
            out = np.full(rows, np.nan)
            if predictions is not None:
                out[accepted] = predictions
            out[~keep] = np.nan
            return out
        classes = self.estimator.classes_
        if classes.dtype.kind in "iub":
            dtype = "boolean" if classes.dtype.kind == "b" else "Int64"
            out = pd.array(np.zeros(rows, dtype=classes.dtype), dtype=dtype)
        else:
            out = pd.array(np.full(rows, None, dtype=object), dtype="string")
        if predictions is not None:
            out[accepted] = predictions if classes.dtype.kind in "iub" else predictions.astype(str)
        out[~keep] = pd.NA
        return out

    def predict_pipeline(self, frame: pd.DataFrame) -> np.ndarray:
        """The pipeline's own answer on ``frame`` (no guard, no fast path): the reference."""
        if self.classify:
            return self.pipeline.predict_proba(frame)
        return self.pipeline.predict(frame)

    def _scores(self, numeric, categorical, frame) -> np.ndarray:
        if self.fast is not None:
            return self._estimate(self.fast.transform(numeric, categorical))
        checked = pd.DataFrame(
            {
                **dict(zip(self.guard.numeric_names, numeric.T, strict=True)),
                **{
                    name: np.where(values == None, np.nan, values)  # noqa: E711 - elementwise
                    for name, values in zip(self.guard.object_names, categorical, strict=True)
                },
            },
            index=frame.index,
        )[self.guard.names]
        return self.predict_pipeline(checked)

    def _estimate(self, X: np.ndarray) -> np.ndarray:
        """The estimator on preprocessed rows; linear models as one matrix product.

        scikit-learn's own ``predict_proba`` spends most of a single-row call
        validating its input, which the contract has already done.
        """
        kind = self._linear_kind
        if kind is None:
            return self.estimator.predict_proba(X) if self.classify else self.estimator.predict(X)
        est = self.estimator
        scores = X @ est.coef_.T + est.intercept_
        if kind == "regression":
            return scores
        if scores.shape[1] == 1:  # binary: the logistic of the one decision value
            positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            return np.column_stack([1.0 - positive, positive])
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        return scores / scores.sum(axis=1, keepdims=True)

    def _classes(self, proba: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(proba).all(axis=1)
        problem = "not_finite"
        if not bad.any():
            sums = proba.sum(axis=1)
            bad = (np.abs(sums - 1.0) > PROBABILITY_TOLERANCE) | (proba < 0).any(axis=1)
            problem = "invalid_probabilities"
        if bad.any():
            row = int(np.argmax(bad))
            total = self.guard.count("abnormal_output")
            logger.warning(
                "stageflow guard: abnormal output (%s) in row %d; %d so far", problem, row, total
            )
            raise AbnormalOutput(
                None,
                problem,
                "the model's class probabilities are NaN, infinite or do not sum to 1",
                row,
            )
        return self.estimator.classes_[proba.argmax(axis=1)]

    def _values(self, values: np.ndarray, note=None) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        finite = np.isfinite(values)
        outside = finite & ((values < self.low) | (values > self.high))
        if finite.all() and not outside.any():
            return values
        row = int(np.argmax(~finite | outside))
        problem = "not_finite" if not finite[row] else "out_of_range"
        total = self.guard.count("abnormal_output")
        target = self.contract["target"]
        if problem == "out_of_range" and self.policy["abnormal_output"] == "clip" and finite.all():
            logger.warning(
                "stageflow guard: clipped %d predictions into the training range; %d so far",
                int(outside.sum()),
                total,
            )
            if note is not None:
                note.problems = _no_problems(values)
                note.problems[outside] = "out_of_range"
            return np.clip(values, self.low, self.high)
        logger.warning(
            "stageflow guard: abnormal output (%s) in row %d; %d so far", problem, row, total
        )
        detail = (
            "the prediction is NaN or infinite"
            if problem == "not_finite"
            else f"the prediction {values[row]:.6g} is outside the accepted range "
            f"[{self.low:.6g}, {self.high:.6g}] (the training target spanned "
            f"{target['min']:.6g} to {target['max']:.6g})"
        )
        raise AbnormalOutput(None, problem, detail, row)


def _no_problems(rows) -> np.ndarray:
    return np.full(len(rows), None, dtype=object)


def _linear_kind(estimator) -> str | None:
    """``"logistic"`` or ``"regression"`` for the linear models computed by hand, else None."""
    from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: PLC0415

    if type(estimator) is LogisticRegression:
        return "logistic"
    if type(estimator) is LinearRegression and np.ndim(estimator.coef_) == 1:
        return "regression"
    return None


def _as_frame(model_input) -> pd.DataFrame:
    """What the scoring server parsed (a DataFrame, or a dict of columns), as a DataFrame."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        try:
            return pd.DataFrame({k: np.atleast_1d(v) for k, v in model_input.items()})
        except ValueError:
            raise Rejected(None, "wrong_shape", "the columns have different lengths") from None
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return pd.DataFrame(model_input)
    raise Rejected(
        None,
        "no_column_names",
        "send named columns: dataframe_split, dataframe_records, or inputs/instances as "
        "records or as a dict of columns",
    )


mlflow.models.set_model(GuardedModel())
