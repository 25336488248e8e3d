"""The monitor's thresholds: the ``monitoring:`` section of the model's policy.

The policy (``registry.policy``) owns the section and its validation; this module
only turns whatever policy applies into the plain mapping the monitor reads, so
the statistics code never depends on how the policy is stored. Where the
policy in use has no ``monitoring`` section (an older registry module), the
defaults below -- the same values the policy declares -- apply, and the report
says so.
"""

from __future__ import annotations

import copy
from pathlib import Path

DEFAULTS: dict = {
    "min_rows": 200,
    "drift": {"psi": 0.2, "p_value": 0.01},
    "prediction_drift": {"psi": 0.2},
    "live_metric": {"margin": 0.05, "confidence": 0.95, "resamples": 1000},
    "slo": {"refusal_rate": 0.05, "error_rate": 0.01, "p99_latency_ms": 1000, "windows": 3},
    "rollback": {"enabled": True, "cooldown": "1h"},
    "retrain": {"on_drift": True, "min_new_labels": 500},
    "auto_promote": False,
}


def resolve(client, model: str, policy=None) -> tuple[str, dict]:
    """``(source, monitoring section)`` for ``model``.

    Args:
        client: an ``MlflowClient``.
        model: the registered model.
        policy: a ``registry.Policy``, a policy file path, or None (the model's own
            policy: its ``stageflow.policy`` tag, else the default).
    """
    from registry import policy as policies  # noqa: PLC0415 - the registry is a sibling stage

    if policy is None or isinstance(policy, str | Path):
        policy = policies.for_model(client, model, policy)
    return policy.source, section(policy)


def section(policy) -> dict:
    """The ``monitoring`` values of a policy object, completed from :data:`DEFAULTS`."""
    given = getattr(policy, "monitoring", None)
    if given is None:
        values = getattr(policy, "values", None)
        given = values.get("monitoring") if isinstance(values, dict) else None
    if hasattr(given, "model_dump"):  # pydantic
        given = given.model_dump()
    merged = copy.deepcopy(DEFAULTS)
    for key, value in (given or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged
