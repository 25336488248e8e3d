"""Promote a version to Staging or Production through its gate."""

from __future__ import annotations

from registry import gates, ledger
from registry._stages import PRODUCTION, STAGING, canonical_stage, get_version
from registry._transition import TransitionResult, transition
from registry.policy import for_model as policy_for
from stageflow import tracking
from stageflow.errors import UsageError

PROMOTION_STAGES = (STAGING, PRODUCTION)


def promote(
    model: str,
    version,
    to: str,
    reason: str = "",
    tracking_uri: str | None = None,
    *,
    dry_run: bool = False,
    allow_breaking: str = "",
    policy_file: str | None = None,
    evidence_run: str = "",
) -> TransitionResult:
    """Move ``version`` of ``model`` into ``to`` (Staging or Production) if its gate passes.

    The previous holder of the stage is archived in the same call, the stage's
    alias follows, and the ledger records who did it, why, and the gate report.
    Promoting a version to the stage it already holds changes nothing. Concurrent
    promotions of one model are serialised by a lock in the registry.

    Args:
        dry_run: run the gates and report, change nothing (no lock, no ledger entry).
        allow_breaking: why an input-schema change that breaks the Production
            version's clients is accepted (recorded in the report); empty refuses it.
        policy_file: a YAML/JSON policy for this promotion instead of the model's own.
        evidence_run: the run that prompted it (e.g. a retrain's), kept in the ledger entry.

    Example:
        >>> promote("wine", 3, "Staging", reason="beats v2 on test accuracy")

    Raises:
        UsageError: unknown model, version or stage; a bad policy.
        Refused: a gate check failed; nothing changed.
    """
    stage = canonical_stage(to)
    if stage not in PROMOTION_STAGES:
        raise UsageError(f"promote moves to Staging or Production, not {stage}")
    client = tracking.client(tracking_uri)
    found = get_version(client, model, version)
    policy = policy_for(client, model, policy_file)
    return transition(
        client,
        model,
        found,
        stage,
        ledger.PROMOTE,
        gates.GATES[stage],
        reason,
        policy=policy,
        allow_breaking=(allow_breaking or "").strip(),
        dry_run=dry_run,
        evidence_run=evidence_run,
    )
