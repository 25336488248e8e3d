"""The data check before every training and tuning run (issue 10).

It classifies each column and decides, by the thresholds in :class:`CheckConfig`,
what training does with it:

- **date/time** (a datetime column, or strings pandas parses as dates): kept, and
  the pipeline turns it into calendar features (:mod:`experiments.features`); the
  model's contract checks it as a date;
- **identifier** (a string or integer column with a distinct value on nearly every
  row, or one named by ``--id-column``): dropped from the features with a warning;
  requests may still send it and the model ignores it;
- **constant** (a single value, or none): dropped with a warning, ignored in requests;
- **target gaps**: rows without a target are dropped, and counted.

After the split it looks for what every data-validation tool warns about: a single
feature that predicts the target almost perfectly on the validation split (leakage),
classes with too few rows, rows of the validation or test split that are copies of
training rows. Leakage and small classes refuse the run under ``strict``.

Example:
    >>> checked = check(frame, "label", seed=42, id_columns=["order_id"])
    >>> checked.report.summary()
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format
from pydantic import BaseModel, ConfigDict, Field

from experiments import data
from experiments.features import as_datetimes
from stageflow.catalog import CLASSIFICATION
from stageflow.errors import UsageError

logger = logging.getLogger(__name__)

DATE, IDENTIFIER, CONSTANT, FEATURE = "date", "identifier", "constant", "feature"
REPORT_JSON, REPORT_MARKDOWN = "data_check.json", "data_check.md"


class CheckConfig(BaseModel):
    """The thresholds of the data check; unknown names are refused (a typo fails loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identifier_distinct_ratio: float = Field(
        0.95,
        gt=0,
        description="distinct values / present values above which a string "
        "or integer column is an identifier",
    )
    identifier_min_rows: int = Field(
        20, ge=1, description="fewer present values than this: never judged an identifier"
    )
    date_parse_ratio: float = Field(
        0.95,
        gt=0,
        le=1,
        description="share of a text column's values that must parse as "
        "dates (in the format pandas infers) for it to be a date column",
    )
    leakage_score: float = Field(
        0.99,
        gt=0,
        le=1,
        description="a single feature scoring this or more on the validation "
        "split (balanced accuracy, or R²) is a suspected leak",
    )
    leakage_min_rows: int = Field(
        50, ge=1, description="validation rows needed to judge leakage (fewer: not judged)"
    )
    leakage_tree_depth: int = Field(8, ge=1, description="depth of the one-feature tree")
    min_class_rows: int = Field(10, ge=1, description="a class with fewer rows is too small")


DEFAULT_CONFIG = CheckConfig()


@dataclass
class Plan:
    """What training does to the columns before the split (data, so tuning workers replay it)."""

    target: str
    dates: dict[str, str | None] = field(default_factory=dict)  # column → strftime format
    identifiers: list[str] = field(default_factory=list)
    declared_identifiers: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    target_missing: int = 0
    columns: dict[str, str] = field(default_factory=dict)  # column → DATE, IDENTIFIER, ...

    @property
    def ignored(self) -> list[str]:
        """Columns dropped from the features that requests may still send."""
        return self.identifiers + self.constants

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` without the dropped columns, its date columns parsed."""
        frame = frame.drop(columns=[c for c in self.ignored if c in frame.columns])
        parsed = {c: as_datetimes(frame[c], fmt) for c, fmt in self.dates.items() if c in frame}
        return frame.assign(**parsed) if parsed else frame


@dataclass
class Report:
    """What the data check found and decided: logged with the run, printed, in ``--json``."""

    plan: Plan
    leakage: list[dict] = field(default_factory=list)  # {column, metric, score}
    small_classes: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)  # split → rows also in train
    notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        plan, lines = self.plan, []
        if plan.identifiers:
            lines.append(
                "identifier-like column(s) dropped from the features (requests may still "
                f"send them): {_names(plan.identifiers)}"
            )
        if plan.constants:
            lines.append(f"constant column(s) dropped: {_names(plan.constants)}")
        if plan.target_missing:
            lines.append(
                f"{plan.target_missing} row(s) without a value in target {plan.target!r} dropped"
            )
        lines += self.refusals
        for split, count in self.duplicates.items():
            if count:
                lines.append(f"{count} {split} row(s) are exact copies of training rows")
        return lines

    @property
    def refusals(self) -> list[str]:
        """The findings ``strict`` refuses: leakage and too-small classes."""
        lines = [
            f"suspected leakage: {item['column']!r} alone scores {item['metric']} "
            f"{item['score']:.3f} on the validation split"
            for item in self.leakage
        ]
        if self.small_classes:
            counts = ", ".join(f"{k!r} ({v})" for k, v in self.small_classes.items())
            lines.append(f"class(es) with fewer than the rows a split needs: {counts}")
        return lines

    def to_json(self) -> dict:
        plan = asdict(self.plan)
        return {
            "columns": plan["columns"],
            "dates": plan["dates"],
            "dropped": {"identifier": plan["identifiers"], "constant": plan["constants"]},
            "declared_identifiers": plan["declared_identifiers"],
            "target_missing_rows": plan["target_missing"],
            "leakage": self.leakage,
            "small_classes": self.small_classes,
            "duplicates_of_train": self.duplicates,
            "warnings": self.warnings,
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        lines = ["# Data check", "", "| column | kind |", "|---|---|"]
        lines += [f"| {c} | {k} |" for c, k in self.plan.columns.items()]
        lines += ["", "## Warnings", ""]
        lines += [f"- {w}" for w in self.warnings] or ["- none"]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One line for the CLI."""
        plan = self.plan
        parts = []
        if plan.dates:
            parts.append(f"date column(s) {_names(plan.dates)} → calendar features")
        if plan.identifiers:
            parts.append(f"identifier(s) {_names(plan.identifiers)} dropped")
        if plan.constants:
            parts.append(f"constant column(s) {_names(plan.constants)} dropped")
        if plan.target_missing:
            parts.append(f"{plan.target_missing} row(s) without a target dropped")
        others = len(self.warnings) - sum(
            bool(x) for x in (plan.identifiers, plan.constants, plan.target_missing)
        )
        if others:
            parts.append(f"{others} warning(s): see data_check.md")
        return "data check: " + ("; ".join(parts) if parts else "nothing to report")


@dataclass
class Checked:
    """The data as training uses it, and the check's findings."""

    X: pd.DataFrame
    splits: data.Splits
    task: str
    plan: Plan
    report: Report


class DataCheckRefused(UsageError):
    """``strict`` and the data check found leakage or too-small classes: exit 2."""


def _names(columns) -> str:
    return ", ".join(repr(str(c)) for c in columns)


# -- classifying columns -------------------------------------------------------------------


def date_format(values: pd.Series, config: CheckConfig = DEFAULT_CONFIG) -> str | None | bool:
    """The strftime format of a text column of dates (pandas' own inference), else False.

    A datetime column answers None (nothing to parse). A text column is a date
    column when a format pandas guesses from its first value (month first, else
    day first) names a year and at least ``config.date_parse_ratio`` of its values
    parse in it.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        return None
    if not (pd.api.types.is_string_dtype(values) or pd.api.types.is_object_dtype(values)):
        return False
    present = values.dropna()
    if present.empty or not all(isinstance(v, str) for v in present.head(100)):
        return False
    first, text = str(present.iloc[0]), present.astype(str)
    # Month first, then day first: "01.11.2007" reads either way, and the rest decide.
    for dayfirst in (False, True):
        guessed = guess_datetime_format(first, dayfirst=dayfirst)
        if guessed is None or not ("%Y" in guessed or "%y" in guessed):
            continue
        parsed = pd.to_datetime(text, format=guessed, errors="coerce")
        if parsed.notna().mean() >= config.date_parse_ratio:
            return guessed
    return False


def is_identifier(values: pd.Series, config: CheckConfig = DEFAULT_CONFIG) -> bool:
    """A string or integer column with a distinct value on (nearly) every present row."""
    text = pd.api.types.is_string_dtype(values) or pd.api.types.is_object_dtype(values)
    integer = pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values)
    present = values.dropna()
    if not (text or integer) or len(present) < config.identifier_min_rows:
        return False
    return present.nunique() / len(present) >= config.identifier_distinct_ratio


def plan(
    frame: pd.DataFrame,
    target: str,
    id_columns=(),
    config: CheckConfig = DEFAULT_CONFIG,
) -> Plan:
    """Classify every column of ``frame`` except ``target`` and decide what training does.

    Raises:
        UsageError: a declared id column that is not in the data, or is the target.
    """
    columns = [str(c) for c in frame.columns]
    for name in id_columns:
        if name == target:
            raise UsageError(f"--id-column {name!r} is the target; name another column")
        if name not in columns:
            raise UsageError(
                f"--id-column {name!r} is not in the data; its columns are: {', '.join(columns)}"
            )
    result = Plan(target=target, declared_identifiers=list(id_columns))
    if target in frame.columns:
        result.target_missing = int(frame[target].isna().sum())
    for name in frame.columns:
        if name == target:
            continue
        values = frame[name]
        if name in id_columns:
            kind = IDENTIFIER
        elif values.nunique(dropna=False) <= 1:
            kind = CONSTANT
        elif (fmt := date_format(values, config)) is not False:
            kind = DATE
            result.dates[name] = fmt
        elif is_identifier(values, config):
            kind = IDENTIFIER
        else:
            kind = FEATURE
        result.columns[str(name)] = kind
        if kind == IDENTIFIER:
            result.identifiers.append(str(name))
        elif kind == CONSTANT:
            result.constants.append(str(name))
    kept = [c for c, k in result.columns.items() if k in (FEATURE, DATE)]
    if target in frame.columns and not kept and result.columns:
        raise UsageError(
            "the data check dropped every feature column "
            f"({'; '.join(Report(result).warnings[:2])}); keep some, or lower the thresholds"
        )
    return result


# -- after the split -----------------------------------------------------------------------


def review(
    checked_plan: Plan, splits: data.Splits, task: str, seed: int, config=DEFAULT_CONFIG
) -> Report:
    """Leakage, too-small classes and cross-split duplicates, on the split data."""
    report = Report(checked_plan)
    if task == CLASSIFICATION:
        counts = pd.concat([splits.y_train, splits.y_val, splits.y_test]).value_counts()
        small = counts[counts < config.min_class_rows]
        report.small_classes = {str(k): int(v) for k, v in small.items()}
    if len(splits.X_val) < config.leakage_min_rows:
        report.notes.append(
            f"leakage not judged: {len(splits.X_val)} validation rows, fewer than "
            f"{config.leakage_min_rows}"
        )
    else:
        report.leakage = single_feature_leaks(splits, task, seed, config)
    train = set(_row_hashes(splits.X_train, splits.y_train))
    report.duplicates = {
        name: int(np.isin(_row_hashes(X, y), list(train)).sum())
        for name, (X, y) in splits.named().items()
        if name != "train"
    }
    return report


def single_feature_leaks(splits: data.Splits, task: str, seed: int, config=DEFAULT_CONFIG):
    """Features whose own one-feature tree scores ``config.leakage_score`` or more."""
    from sklearn.metrics import balanced_accuracy_score, r2_score  # noqa: PLC0415
    from sklearn.preprocessing import OrdinalEncoder  # noqa: PLC0415
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor  # noqa: PLC0415

    classify = task == CLASSIFICATION
    metric = "balanced_accuracy" if classify else "r2"
    scorer = balanced_accuracy_score if classify else r2_score
    tree = DecisionTreeClassifier if classify else DecisionTreeRegressor
    leaks = []
    for column in splits.X_train.columns:
        train, val = splits.X_train[column], splits.X_val[column]
        if pd.api.types.is_datetime64_any_dtype(train):
            train, val = (_seconds(s).to_frame() for s in (train, val))
        elif pd.api.types.is_numeric_dtype(train) and not pd.api.types.is_bool_dtype(train):
            train, val = train.astype(float).to_frame(), val.astype(float).to_frame()
        else:
            encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
            train = encoder.fit_transform(train.astype(str).to_frame())
            val = encoder.transform(val.astype(str).to_frame())
        model = tree(max_depth=config.leakage_tree_depth, random_state=seed)
        model.fit(train, splits.y_train)
        score = float(scorer(splits.y_val, model.predict(val)))
        if score >= config.leakage_score:
            leaks.append({"column": str(column), "metric": metric, "score": round(score, 6)})
    return leaks


def _seconds(dates: pd.Series) -> pd.Series:
    return (dates - pd.Timestamp("1970-01-01")).dt.total_seconds()


def _row_hashes(X: pd.DataFrame, y: pd.Series) -> np.ndarray:
    rows = pd.util.hash_pandas_object(X, index=False).to_numpy()
    return rows ^ pd.util.hash_pandas_object(y, index=False).to_numpy()


# -- the door train and tune use -----------------------------------------------------------


def check(
    frame: pd.DataFrame,
    target: str,
    *,
    seed: int,
    task: str | None = None,
    id_columns=(),
    strict: bool = False,
    config: CheckConfig = DEFAULT_CONFIG,
) -> Checked:
    """Check ``frame``, prepare its features and split them, as training does.

    Each warning is logged (one line naming the columns) as it is found.

    Raises:
        UsageError: bad target or id column (see :func:`plan`, ``data.features_and_target``).
        DataCheckRefused: ``strict`` and leakage or too-small classes were found.
    """
    decided = plan(frame, target, id_columns, config)
    X, y, task = data.features_and_target(decided.apply(frame), target, task)
    X = data.prepare_features(X)
    splits = data.split(X, y, task, seed)
    report = review(decided, splits, task, seed, config)
    for line in report.warnings:
        logger.warning("data check: %s", line)
    if strict and report.refusals:
        raise DataCheckRefused(
            f"data check refused the data (--strict): {report.refusals[0]}; "
            "fix the data, or run without --strict to train anyway"
        )
    return Checked(X, splits, task, decided, report)


def log(report: Report) -> None:
    """The report as ``data_check.json`` and ``data_check.md`` on the active run."""
    import mlflow  # noqa: PLC0415 - only where a run is open

    mlflow.log_dict(report.to_json(), REPORT_JSON)
    mlflow.log_text(report.to_markdown(), REPORT_MARKDOWN)
