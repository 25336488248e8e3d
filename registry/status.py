"""What is where, and what happened: ``status`` and ``history``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from registry import _lock, ledger
from registry._stages import (
    ALIAS_FOR_STAGE,
    PRODUCTION,
    STAGING,
    alias_target,
    holders,
    require_model,
    versions,
)
from stageflow import manifest, tracking


@dataclass
class Status:
    model: str
    production: str | None
    staging: str | None
    aliases: dict[str, str | None]
    versions: list[dict]
    last_transition: dict | None
    problems: list[str] = field(default_factory=list)
    lock: str | None = None  # who holds the model's promotion lock right now

    def to_json(self) -> dict:
        return self.__dict__.copy()


def status(model: str, tracking_uri: str | None = None) -> Status:
    """Which version holds each stage, what the aliases say, and anything inconsistent.

    Problems flagged: a stage held by more than one version, a stage without its
    alias (or an alias on a version outside its stage), a transition the ledger
    shows as interrupted, a Production or Staging version whose files in the store
    are not the ones its manifest recorded (``stageflow.manifest``). ``stageflow status
    --repair`` (:func:`registry.repair`) fixes each but the last (re-register the
    version, or roll back) and records the fix in the ledger.
    """
    client = tracking.client(tracking_uri)
    require_model(client, model)
    all_versions = versions(client, model)
    problems = []
    holder = {}
    aliases = {}
    for stage, alias in ALIAS_FOR_STAGE.items():
        held = [str(v.version) for v in holders(client, model, stage)]
        aliased = alias_target(client, model, alias)
        aliases[alias] = aliased
        holder[stage] = aliased if aliased in held else (held[-1] if held else None)
        if len(held) > 1:
            problems.append(f"{stage} is held by versions {', '.join(held)} (expected one)")
        if held and aliased is None:
            problems.append(f"{stage} version {held[-1]} has no @{alias} alias")
        elif aliased is not None and aliased not in held:
            problems.append(f"@{alias} points at version {aliased}, which is not in {stage}")
    history = ledger.entries(client, model, include_all=True)
    for entry in history:
        if entry.outcome == ledger.INTERRUPTED:
            problems.append(
                f"the {entry.action} of version {entry.version} to {entry.to_stage} "
                f"started {_ago(entry.time)} was interrupted (ledger run {entry.run_id}); "
                "re-run the same command, or `stageflow status --repair`"
            )
    # Files changed in the store since registration: refused at their next load.
    for version in sorted({v for v in holder.values() if v is not None}, key=int):
        if found := manifest.check_store(client, model, version):
            problems.append(found)
    done = [e for e in history if e.outcome == ledger.DONE]
    return Status(
        model=model,
        production=holder[PRODUCTION],
        staging=holder[STAGING],
        aliases=aliases,
        versions=[
            {
                "version": str(v.version),
                "stage": v.current_stage,
                "aliases": list(v.aliases),
                "run_id": v.run_id,
                "description": v.description or "",
            }
            for v in all_versions
        ],
        last_transition=done[-1].to_json() if done else None,
        problems=problems,
        lock=_lock.describe(client, model),
    )


def history(model: str, tracking_uri: str | None = None) -> list[ledger.Entry]:
    """Every transition that happened to ``model``, oldest first."""
    client = tracking.client(tracking_uri)
    require_model(client, model)
    return ledger.entries(client, model)


def _ago(seconds: float) -> str:
    delta = max(0, time.time() - seconds)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
