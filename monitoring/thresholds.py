"""The monitor's thresholds: the ``monitoring:`` section of the model's policy.

The policy (``registry.policy``) owns the section, its defaults and its validation;
this module only turns whatever policy applies into the plain mapping the monitor
reads, so the statistics code never depends on how the policy is stored.
"""

from __future__ import annotations

from pathlib import Path


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
    """The ``monitoring`` values of a ``registry.Policy``, as a plain mapping."""
    return policy.monitoring.model_dump(mode="json")
