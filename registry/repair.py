"""Bring the registry and the ledger back in step after a fault or a change made outside Stageflow.

Stages are the truth for "did it happen": a move writes the stage first (one
backend call that also archives the previous holder) and the aliases after. So:

- an interrupted ledger entry whose version now holds the target stage happened
  (the entry is closed as done, saying it was confirmed by repair); one whose
  version does not, did not (closed as failed) -- the ledger never claims a
  transition the registry does not show;
- a stage held by several versions keeps one -- the latest one the ledger put
  there, else the one its alias names, else the newest -- and archives the rest;
- an alias follows its stage's holder, and is removed when the stage is empty.

Every fix is a ``repair`` entry in the ledger. Runs under the model's lock: by
every promotion before it does anything else, and by ``stageflow repair``.
"""

from __future__ import annotations

import logging
import warnings

from mlflow import MlflowClient

from registry import _lock, ledger
from registry._stages import (
    ALIAS_FOR_STAGE,
    ARCHIVED,
    alias_target,
    holders,
    require_model,
)
from stageflow import tracking

logger = logging.getLogger(__name__)


def repair(model: str, reason: str = "", tracking_uri: str | None = None) -> list[str]:
    """Fix what ``status`` flags for ``model``; returns what was fixed (empty: nothing to do).

    Example:
        >>> repair("wine", reason="someone used the MLflow UI")
    """
    client = tracking.client(tracking_uri)
    require_model(client, model)
    lease = _lock.acquire(client, model, ledger.actor())
    try:
        return settle(client, model, lease, reason or "stageflow repair")
    finally:
        lease.release()


def settle(client: MlflowClient, model: str, lease: _lock.Lease, reason: str) -> list[str]:
    """Close interrupted ledger entries and make stages and aliases agree (lock held)."""
    fixed = _close_interrupted(client, model)
    for stage, alias in ALIAS_FOR_STAGE.items():
        fixed += _fix_stage(client, model, stage, alias, lease, reason)
    for line in fixed:
        logger.warning("%s: %s", model, line)
    return fixed


def _close_interrupted(client: MlflowClient, model: str) -> list[str]:
    fixed = []
    for entry in ledger.entries(client, model, include_all=True):
        if entry.outcome != ledger.INTERRUPTED:
            continue
        stage = client.get_model_version(model, entry.version).current_stage
        if stage == entry.to_stage:
            detail = (
                f"interrupted after the registry moved version {entry.version} to {stage}; "
                "confirmed by repair"
            )
            ledger.finish(client, entry, ledger.DONE, detail=detail)
        else:
            detail = (
                f"interrupted before the registry moved it (version {entry.version} is in "
                f"{stage}); nothing happened"
            )
            ledger.finish(client, entry, ledger.FAILED, detail=detail)
        fixed.append(f"ledger run {entry.run_id} ({entry.action} v{entry.version}): {detail}")
    return fixed


def _fix_stage(client, model, stage, alias, lease, reason) -> list[str]:
    held = [str(v.version) for v in holders(client, model, stage)]
    aliased = alias_target(client, model, alias)
    actions = []
    keep = None
    if held:
        keep = _last_placed(client, model, stage, held) or (
            aliased if aliased in held else max(held, key=int)
        )
        for extra in (v for v in held if v != keep):
            lease.ensure()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated
                client.transition_model_version_stage(model, extra, ARCHIVED)
            actions.append(f"archived version {extra} (a second {stage} holder)")
        if aliased != keep:
            lease.ensure()
            client.set_registered_model_alias(model, alias, keep)
            actions.append(f"pointed @{alias} at version {keep} (was {aliased or 'unset'})")
    elif aliased is not None:
        lease.ensure()
        client.delete_registered_model_alias(model, alias)
        actions.append(f"removed @{alias} from version {aliased}, which is not in {stage}")
    if not actions:
        return []
    detail = "; ".join(actions)
    entry = ledger.begin(
        client,
        ledger.Entry(
            model=model,
            version=keep or "",  # an emptied stage holds no version (the detail names it)
            from_stage=stage,
            to_stage=stage,
            action=ledger.REPAIR,
            actor=ledger.actor(),
            reason=reason,
        ),
        lease,
    )
    ledger.finish(client, entry, ledger.DONE, detail=detail)
    return [f"{stage}: {detail}"]


def _last_placed(client, model: str, stage: str, held: list[str]) -> str | None:
    """Of the versions holding ``stage``, the one the ledger put there last, if any."""
    for entry in reversed(ledger.entries(client, model)):
        if entry.to_stage == stage and entry.version in held:
            return entry.version
    return None
