"""Roll Production back to the version that held it before (or to a chosen one)."""

from __future__ import annotations

from registry import gates, ledger
from registry._stages import PRODUCTION, current_version, get_version, require_model
from registry._transition import TransitionResult, transition
from stageflow import tracking
from stageflow.errors import StageflowError, UsageError


def rollback_target(client, model: str) -> str:
    """The version that was Production before the current one, from the ledger."""
    current = current_version(client, model, PRODUCTION)
    lineage = ledger.production_lineage(ledger.entries(client, model))
    earlier = [v for v in lineage if v != current]
    if not earlier:
        raise StageflowError(
            f"the ledger of {model} has no earlier Production version to roll back to; "
            "choose one with --to V (see `stageflow history`)"
        )
    return earlier[-1]


def rollback(
    model: str,
    to=None,
    reason: str = "",
    tracking_uri: str | None = None,
    *,
    evidence_run: str = "",
) -> TransitionResult:
    """Put the previous Production version (or ``to``) back into Production.

    The current Production version is archived and the rollback is a ledger
    entry of its own. Rollback skips comparisons -- it is the emergency exit --
    but the target must still load and predict. ``evidence_run`` names the run that
    prompted it (``stageflow watch`` links its monitoring run) in the ledger entry.

    Raises:
        StageflowError: nothing is in Production, or there is nothing to go back to.
        UsageError: ``to`` does not exist or is already Production.
        Refused: the target does not load or predict.
    """
    client = tracking.client(tracking_uri)
    require_model(client, model)
    current = current_version(client, model, PRODUCTION)
    if to is None:
        if current is None:
            raise StageflowError(f"{model} has no Production version to roll back from")
        to = rollback_target(client, model)
    target = get_version(client, model, to)
    if str(target.version) == current:
        raise UsageError(f"version {to} of {model} is already in Production")
    return transition(
        client,
        model,
        target,
        PRODUCTION,
        ledger.ROLLBACK,
        gates.ROLLBACK_GATE,
        reason or f"rollback from version {current}",
        evidence_run=evidence_run,
    )
