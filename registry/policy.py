"""Promotion policies: the numbers the gates judge by, kept as data.

A policy has three sections; anything it leaves out keeps the default below::

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

Where a policy comes from, first match wins: ``promote --policy FILE``; the
registered model's ``stageflow.policy`` tag (``stageflow policy set``); the default.
``thresholds`` replaces the default rules as a whole (a policy states its rules);
``latency`` and ``comparison`` override key by key. Unknown keys, metrics or
operators are refused when the policy is read, so a typo never silently weakens a gate.
"""

from __future__ import annotations

import copy
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry._stages import require_model
from stageflow.errors import UsageError

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

DEFAULT_POLICY: dict = {
    # Worse than a coin flip, or than predicting the mean, is a bug, not a model.
    "thresholds": {"accuracy": ">= 0.5", "r2": ">= 0"},
    "latency": {
        "single_row_p95_ms": 100.0,
        "batch_p95_ms": 1000.0,
        "batch_rows": 1000,
        "repeats": 20,
    },
    "comparison": {
        "margin": 0.02,
        "require_improvement": False,
        "confidence": 0.95,
        "resamples": 1000,
    },
}
_BOOL_KEYS = {"comparison": {"require_improvement"}}


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
    values: dict

    @property
    def thresholds(self) -> list[Threshold]:
        return [_threshold(m, rule) for m, rule in self.values["thresholds"].items()]

    @property
    def latency(self) -> dict:
        return self.values["latency"]

    @property
    def comparison(self) -> dict:
        return self.values["comparison"]

    def to_json(self) -> dict:
        return {"source": self.source, **copy.deepcopy(self.values)}


def parse(document: dict | None, source: str) -> Policy:
    """Validate a policy document (a partial one is completed from the default).

    Raises:
        UsageError: an unknown section, key, metric or operator, or a bad value.
    """
    document = document or {}
    if not isinstance(document, dict):
        raise UsageError(f"policy {source}: expected a mapping of sections, got {document!r}")
    unknown = set(document) - set(DEFAULT_POLICY)
    if unknown:
        raise UsageError(
            f"policy {source}: unknown section(s) {', '.join(sorted(map(str, unknown)))}; "
            f"valid: {', '.join(DEFAULT_POLICY)}"
        )
    values = copy.deepcopy(DEFAULT_POLICY)
    for section, given in document.items():
        if not isinstance(given, dict):
            raise UsageError(f"policy {source}: {section} must be a mapping, got {given!r}")
        if section == "thresholds":
            for metric, rule in given.items():
                _threshold(metric, rule, source)
            values["thresholds"] = {str(m): str(r) for m, r in given.items()}
            continue
        for key, value in given.items():
            if key not in values[section]:
                raise UsageError(
                    f"policy {source}: unknown key {section}.{key}; "
                    f"valid: {', '.join(values[section])}"
                )
            values[section][key] = _value(section, key, value, source)
    return Policy(source, values)


def load_file(path: str | Path) -> Policy:
    """A policy from a YAML or JSON file (JSON is YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"policy file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"policy file {path} is not valid YAML/JSON: {exc}") from None
    return parse(document, f"file {path}")


def for_model(client: MlflowClient, model: str, path: str | Path | None = None) -> Policy:
    """The policy for promoting ``model``: ``path``, else the model's tag, else the default."""
    if path:
        return load_file(path)
    require_model(client, model)
    text = client.get_registered_model(model).tags.get(POLICY_TAG)
    if not text:
        return parse({}, DEFAULT_SOURCE)
    try:
        document = json.loads(text)
    except ValueError:
        raise UsageError(
            f"the {POLICY_TAG} tag of {model} is not JSON; replace it with "
            f"`stageflow policy set --model {model} --file policy.yaml`"
        ) from None
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
    document = {k: policy.values[k] for k in DEFAULT_POLICY}
    try:
        client.set_registered_model_tag(model, POLICY_TAG, json.dumps(document, sort_keys=True))
    except MlflowException as exc:
        raise UsageError(f"could not store the policy on {model}: {exc.message}") from None
    return Policy(f"model tag {POLICY_TAG}", document)


def show_policy(model: str, tracking_uri: str | None = None) -> Policy:
    """The policy promotions of ``model`` would run under now."""
    from stageflow import tracking  # noqa: PLC0415

    return for_model(tracking.client(tracking_uri), model)


def _threshold(metric, rule, source: str = "policy") -> Threshold:
    if metric not in KNOWN_METRICS:
        raise UsageError(
            f"policy {source}: unknown metric {metric!r} in thresholds; "
            f"valid: {', '.join(KNOWN_METRICS)}"
        )
    match = _RULE.match(str(rule))
    if not match:
        raise UsageError(
            f'policy {source}: threshold {metric}: {rule!r} is not a rule like ">= 0.8" '
            f"(operators: {', '.join(OPERATORS)})"
        )
    return Threshold(metric, match.group(1), float(match.group(2)))


def _value(section: str, key: str, value, source: str):
    if key in _BOOL_KEYS.get(section, ()):
        if not isinstance(value, bool):
            raise UsageError(f"policy {source}: {section}.{key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"policy {source}: {section}.{key} must be a non-negative number")
    if key == "confidence" and not 0.5 <= value < 1:
        raise UsageError(f"policy {source}: comparison.confidence must be in [0.5, 1)")
    if key in ("batch_rows", "repeats", "resamples"):
        if int(value) != value or value < 1:
            raise UsageError(f"policy {source}: {section}.{key} must be a whole number >= 1")
        return int(value)
    return float(value)
