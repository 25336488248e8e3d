"""Promote a version to Staging or Production through its gate."""

from __future__ import annotations

from registry import gates, ledger
from registry._stages import (
    ALIAS_FOR_STAGE,
    PRODUCTION,
    STAGING,
    alias_target,
    canonical_stage,
    get_version,
)
from registry._transition import TransitionResult, transition
from stageflow import tracking
from stageflow.errors import UsageError

PROMOTION_STAGES = (STAGING, PRODUCTION)


def promote(
    model: str,
    version,
    to: str,
    reason: str = "",
    tracking_uri: str | None = None,
) -> TransitionResult:
    """Move ``version`` of ``model`` into ``to`` (Staging or Production) if its gate passes.

    The previous holder of the stage is archived in the same call, the stage's
    alias follows, and the ledger records who did it and why. Promoting a version
    to the stage it already holds changes nothing.

    Example:
        >>> promote("wine", 3, "Staging", reason="beats v2 on test accuracy")

    Raises:
        UsageError: unknown model, version or stage.
        Refused: a gate check failed; nothing changed.
    """
    stage = canonical_stage(to)
    if stage not in PROMOTION_STAGES:
        raise UsageError(f"promote moves to Staging or Production, not {stage}")
    client = tracking.client(tracking_uri)
    found = get_version(client, model, version)
    if found.current_stage == stage and alias_target(client, model, ALIAS_FOR_STAGE[stage]) == str(
        found.version
    ):
        return TransitionResult(
            model=model,
            version=str(found.version),
            from_stage=stage,
            to_stage=stage,
            action=ledger.PROMOTE,
            changed=False,
            reason=reason,
        )
    return transition(client, model, found, stage, ledger.PROMOTE, gates.GATES[stage], reason)
