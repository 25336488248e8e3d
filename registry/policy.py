"""Promotion policies: the numbers the gates (and the monitor) judge by, kept as data.

A policy has four sections; anything it leaves out keeps the default below::

    thresholds:            # absolute floors/ceilings on the version's logged test metrics
      accuracy: ">= 0.8"   # test_accuracy on the version's run
      rmse: "<= 60"        # rules for the other task's metrics are skipped, not failed
    latency:               # measured in-process on the loaded version, before Staging
      single_row_p95_ms: 100
      batch_p95_ms: 1000   # one call on `batch_rows` rows
      batch_rows: 1000
      repeats: 20
    comparison:            # champion vs challenger before Production
      margin: 0.02         # non-inferiority: at most 2% worse than the champion's score
      require_improvement: false   # true: better with confidence, not merely not worse
      confidence: 0.95
      resamples: 1000      # paired bootstrap resamples
      live: {min_rows: 500, since: "7d"}   # `serve --shadow`: judged on live labelled rows
                           # when at least min_rows pair up in the window, else offline
    monitoring:            # what the monitor and the closed loop judge served traffic by
      min_rows: 200                      # below this a check says "not enough rows"
      drift: {psi: 0.2, p_value: 0.01}   # a column drifts when PSI > psi and p < p_value
      prediction_drift: {psi: 0.2}
      live_metric: {margin: 0.05, confidence: 0.95, resamples: 1000}
      slo: {refusal_rate: 0.05, error_rate: 0.01, p99_latency_ms: 1000, windows: 3}
      rollback: {enabled: true, cooldown: "1h"}
      retrain: {on_drift: true, min_new_labels: 500}
      auto_promote: false

Where a policy comes from, first match wins: ``promote --policy FILE``; the
registered model's ``stageflow.policy`` tag (``stageflow policy set``); the default.
``thresholds`` replaces the default rules as a whole (a policy states its rules); every
other section overrides key by key, at every depth. Unknown sections, keys, metrics or
operators, keys given twice, NaN and infinity are refused when the policy is read — with
one line naming the key and the fix — so a typo never silently weakens a gate.

The sections are pydantic models (``extra="forbid"``, strict types); a section also
reads like the mapping it was before (``policy.comparison["margin"]``).
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)

from registry._stages import require_model
from stageflow.durations import parse as parse_duration
from stageflow.errors import UsageError

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_SOURCE",
    "KNOWN_METRICS",
    "OPERATORS",
    "POLICY_TAG",
    "TASK_METRICS",
    "ComparisonPolicy",
    "LatencyBudget",
    "MonitoringPolicy",
    "Policy",
    "PolicyDocument",
    "Threshold",
    "for_model",
    "from_tag",
    "load_file",
    "parse",
    "parse_duration",
    "set_policy",
    "show_policy",
]

POLICY_TAG = "stageflow.policy"
DEFAULT_SOURCE = "default"

# The test metrics training logs (``test_<name>``), by task.
TASK_METRICS = {
    "classification": ("accuracy", "f1", "roc_auc", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}
KNOWN_METRICS = tuple(m for names in TASK_METRICS.values() for m in names)
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")


# --- value types: strict (no "3" for 3, no "yes" for true), finite -----------------------


def _in_unit_interval(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError("must be a fraction in [0, 1]")
    return value


def _a_confidence(value: float) -> float:
    if not 0.5 <= value < 1:
        raise ValueError("must be in [0.5, 1)")
    return value


def _a_p_value(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError("must be in (0, 1)")
    return value


def _a_duration(value: str) -> str:
    parse_duration(value)
    return value


# Strict types: pydantic's lax mode would turn "yes" into true and "3" into 3.0.
# StrictFloat takes an int (1000 → 1000.0) but never a bool or text.
Number = Annotated[StrictFloat, Field(ge=0)]
Fraction = Annotated[StrictFloat, AfterValidator(_in_unit_interval)]
Confidence = Annotated[StrictFloat, AfterValidator(_a_confidence)]
PValue = Annotated[StrictFloat, AfterValidator(_a_p_value)]
Count = Annotated[StrictInt, Field(ge=1)]
NonNegativeCount = Annotated[StrictInt, Field(ge=0)]
Duration = Annotated[str, Field(strict=True), AfterValidator(_a_duration)]


class _Section(BaseModel):
    """A policy section: unknown keys refused, NaN/inf refused, immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def __getitem__(self, key: str):
        """Mapping-style access (``policy.latency["repeats"]``), as sections read before."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


class LatencyBudget(_Section):
    """Predict-latency budget of a version entering Staging (in-process, loaded model)."""

    single_row_p95_ms: Number = 100.0
    batch_p95_ms: Number = 1000.0
    batch_rows: Count = 1000
    repeats: Count = 20


class LiveComparisonPolicy(_Section):
    """Champion vs challenger on live rows (``serve --shadow``): used from ``min_rows`` pairs.

    A labelled live row counts when both versions answered it: Production to the client,
    the challenger as its shadow, within the last ``since``. Fewer, and the gate compares
    on the challenger's test split instead (the gate report says which it used).
    """

    min_rows: Count = 500
    since: Duration = "7d"


class ComparisonPolicy(_Section):
    """Champion vs challenger before Production (paired bootstrap: live rows, or the test split)."""

    margin: Number = 0.02
    require_improvement: StrictBool = False
    confidence: Confidence = 0.95
    resamples: Count = 1000
    live: LiveComparisonPolicy = LiveComparisonPolicy()


class DriftPolicy(_Section):
    """A column drifts when its PSI is above ``psi`` and the test's p-value below ``p_value``."""

    psi: Number = 0.2
    p_value: PValue = 0.01


class PredictionDriftPolicy(_Section):
    """The predictions' distribution drifts when its PSI is above ``psi``."""

    psi: Number = 0.2


class LiveMetricPolicy(_Section):
    """The labelled live metric vs the version's own test metric (relative margin)."""

    margin: Number = 0.05
    confidence: Confidence = 0.95
    resamples: Count = 1000


class SloPolicy(_Section):
    """Service levels over served traffic; an alarm after ``windows`` windows in breach."""

    refusal_rate: Fraction = 0.05
    error_rate: Fraction = 0.01
    p99_latency_ms: Number = 1000.0
    windows: Count = 3


class RollbackPolicy(_Section):
    """Automatic rollback on an alarm, at most once per ``cooldown`` (e.g. "1h")."""

    enabled: StrictBool = True
    cooldown: Duration = "1h"

    @property
    def cooldown_seconds(self) -> float:
        """The cooldown in seconds."""
        return parse_duration(self.cooldown).total_seconds()


class RetrainPolicy(_Section):
    """When the loop retrains: on drift, and/or once enough new labels arrived."""

    on_drift: StrictBool = True
    min_new_labels: NonNegativeCount = 500


class MonitoringPolicy(_Section):
    """What the monitor and the closed loop judge served traffic by (MONITORING_CONTRACT)."""

    min_rows: Count = 200
    drift: DriftPolicy = DriftPolicy()
    prediction_drift: PredictionDriftPolicy = PredictionDriftPolicy()
    live_metric: LiveMetricPolicy = LiveMetricPolicy()
    slo: SloPolicy = SloPolicy()
    rollback: RollbackPolicy = RollbackPolicy()
    retrain: RetrainPolicy = RetrainPolicy()
    auto_promote: StrictBool = False


# Worse than a coin flip, or than predicting the mean, is a bug, not a model.
DEFAULT_THRESHOLDS = {"accuracy": ">= 0.5", "r2": ">= 0"}


class PolicyDocument(_Section):
    """A whole policy: every section, completed from the defaults."""

    thresholds: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    latency: LatencyBudget = LatencyBudget()
    comparison: ComparisonPolicy = ComparisonPolicy()
    monitoring: MonitoringPolicy = MonitoringPolicy()

    @field_validator("thresholds", mode="after")
    @classmethod
    def _rules(cls, given: dict) -> dict:
        for metric, rule in given.items():
            _threshold(metric, rule)
        return {str(m): str(r) for m, r in given.items()}


DEFAULT_POLICY: dict = PolicyDocument().model_dump(mode="json")


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    bound: float

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Policy:
    """A validated policy and where it came from (the gate report names the source)."""

    source: str
    document: PolicyDocument

    @property
    def values(self) -> dict:
        """Every section as plain data (what ``policy show`` prints and the tag stores)."""
        return self.document.model_dump(mode="json")

    @property
    def thresholds(self) -> list[Threshold]:
        return [_threshold(m, rule) for m, rule in self.document.thresholds.items()]

    @property
    def latency(self) -> LatencyBudget:
        return self.document.latency

    @property
    def comparison(self) -> ComparisonPolicy:
        return self.document.comparison

    @property
    def monitoring(self) -> MonitoringPolicy:
        return self.document.monitoring

    def to_json(self) -> dict:
        return {"source": self.source, **self.values}


def parse(document: Any, source: str) -> Policy:
    """Validate a policy document (a partial one is completed from the default).

    Args:
        document: the parsed YAML/JSON (a mapping of sections), or None for the default.
        source: where it came from, named in errors and in the gate report.

    Raises:
        UsageError: one line naming every unknown section, key, metric or operator and
            every bad value, with what would be valid.
    """
    document = {} if document is None else document
    if not isinstance(document, dict):
        raise UsageError(
            f"policy {source}: expected a mapping of sections "
            f"({', '.join(PolicyDocument.model_fields)}), got {document!r}"
        )
    try:
        return Policy(source, PolicyDocument.model_validate(document))
    except ValidationError as exc:
        raise UsageError(f"policy {source}: {_explain(exc)}") from None


def load_file(path: str | Path) -> Policy:
    """A policy from a YAML or JSON file (JSON is YAML); a key given twice is refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"policy file {path} does not exist")
    try:
        document = yaml.load(path.read_text(), Loader=_StrictLoader)  # safe loader
    except _DuplicateKey as exc:
        raise UsageError(f"policy file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(
            f"policy file {path} is not valid YAML/JSON: {_yaml_problem(exc)}"
        ) from None
    return parse(document, f"file {path}")


def for_model(client: MlflowClient, model: str, path: str | Path | None = None) -> Policy:
    """The policy for promoting ``model``: ``path``, else the model's tag, else the default."""
    if path:
        return load_file(path)
    require_model(client, model)
    return from_tag(client.get_registered_model(model).tags.get(POLICY_TAG), model)


def from_tag(text: str | None, model: str) -> Policy:
    """The policy stored as ``model``'s ``stageflow.policy`` tag (JSON), or the default."""
    if not text:
        return parse({}, DEFAULT_SOURCE)
    fix = f"replace it with `stageflow policy set --model {model} --file policy.yaml`"
    try:
        document = json.loads(
            text, object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant
        )
    except _DuplicateKey as exc:
        raise UsageError(f"the {POLICY_TAG} tag of {model}: {exc}; {fix}") from None
    except ValueError:
        raise UsageError(f"the {POLICY_TAG} tag of {model} is not JSON; {fix}") from None
    return parse(document, f"model tag {POLICY_TAG}")


def set_policy(model: str, path: str | Path, tracking_uri: str | None = None) -> Policy:
    """Validate the policy file and store it on the registered model (``stageflow.policy``).

    Example:
        >>> set_policy("wine", "policy.yaml")
    """
    from stageflow import tracking  # noqa: PLC0415 - keeps this module free of CLI concerns

    policy = load_file(path)
    client = tracking.client(tracking_uri)
    require_model(client, model)
    try:
        client.set_registered_model_tag(
            model, POLICY_TAG, json.dumps(policy.values, sort_keys=True)
        )
    except MlflowException as exc:
        raise UsageError(f"could not store the policy on {model}: {exc.message}") from None
    return Policy(f"model tag {POLICY_TAG}", policy.document)


def show_policy(model: str, tracking_uri: str | None = None) -> Policy:
    """The policy promotions of ``model`` would run under now."""
    from stageflow import tracking  # noqa: PLC0415

    return for_model(tracking.client(tracking_uri), model)


def _threshold(metric, rule, source: str | None = None) -> Threshold:
    where = f"policy {source}: " if source else ""
    if metric not in KNOWN_METRICS:
        raise ValueError(
            f"{where}unknown metric {metric!r} in thresholds; valid: {', '.join(KNOWN_METRICS)}"
        )
    match = _RULE.match(str(rule)) if isinstance(rule, str) else None
    bound = float(match.group(2)) if match else math.nan
    if not match or not math.isfinite(bound):
        raise ValueError(
            f'{where}threshold {metric}: {rule!r} is not a rule like ">= 0.8" '
            f"(operators: {', '.join(OPERATORS)}; a finite number)"
        )
    return Threshold(metric, match.group(1), bound)


# --- one line out of pydantic's errors -------------------------------------------------

_PHRASES = {
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "string_type": "must be text (quoted)",
    "finite_number": "must be a finite number, not NaN or infinity",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _explain(exc: ValidationError) -> str:
    """Every problem pydantic found, on one line, each naming its key and the fix."""
    problems, unknown_sections = [], []
    for error in exc.errors(include_url=False):
        loc = tuple(str(part) for part in error["loc"] if part != "[key]")
        kind = error["type"]
        if kind == "extra_forbidden" and len(loc) == 1:
            unknown_sections.append(loc[0])
            continue
        key = ".".join(loc)
        if kind == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            problems.append(f"unknown key {key}; valid: {', '.join(valid)}")
            continue
        if kind == "value_error":
            message = str(error.get("ctx", {}).get("error", error["msg"]))
            if loc[:1] == ("thresholds",):  # its messages name the metric and the rule
                problems.append(message)
            else:
                problems.append(f"{key} {message} (got {error['input']!r})")
            continue
        phrase = _PHRASES.get(kind)
        if phrase is None and kind in ("greater_than_equal", "greater_than"):
            bound = error["ctx"].get("ge", error["ctx"].get("gt"))
            phrase = f"must be {'>=' if kind == 'greater_than_equal' else '>'} {bound}"
        phrase = phrase or error["msg"].lower()
        problems.append(f"{key} {phrase} (got {error['input']!r})")
    if unknown_sections:
        problems.insert(
            0,
            f"unknown section(s) {', '.join(sorted(unknown_sections))}; "
            f"valid: {', '.join(PolicyDocument.model_fields)}",
        )
    return "; ".join(dict.fromkeys(problems))


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = PolicyDocument
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


# --- loaders that refuse a key given twice ---------------------------------------------


class _DuplicateKey(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with a key given twice is an error.

    PyYAML (and ``json``) silently keep the last of two equal keys; no kept library
    offers a switch for it, so the check is hand-written here.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        mark = key_node.start_mark
        where = f"line {mark.line + 1} column {mark.column + 1}"
        if key in seen:
            raise _DuplicateKey(f"key {key!r} is given twice ({seen[key]} and {where}); keep one")
        seen[key] = where
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"key {key!r} is given twice; keep one")
        result[key] = value
    return result


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a policy accepts")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
