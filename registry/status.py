"""What is where, and what happened: ``status`` and ``history``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from registry import _lock, ledger
from registry._stages import PRODUCTION, STAGING, placements, require_model, versions
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
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong

    def to_json(self) -> dict:
        return self.__dict__.copy()


def status(model: str, tracking_uri: str | None = None) -> Status:
    """Which version holds each stage, what the aliases say, and anything inconsistent.

    Production (and Staging) is what ``serve`` follows too (``registry._stages.placements``):
    the version holding the stage and its alias, and the one the ledger put there. Problems
    flagged: a stage split (held by several versions, its alias elsewhere or missing, or
    moved outside Stageflow behind the ledger's back) with the fix; a transition the
    ledger shows as interrupted; a ledger entry missing, altered or repeated (its chain).
    ``stageflow status --repair`` (:func:`registry.repair`) fixes the registry's side of
    each and records the fix in the ledger. Also flagged: a Production or Staging version
    whose files in the store are not the ones its manifest recorded (``stageflow.manifest``;
    the fix is to roll back and re-register the version).
    """
    client = tracking.client(tracking_uri)
    require_model(client, model)
    all_versions = versions(client, model)
    placed = placements(client, model)
    problems = []
    for where in placed.values():
        if where.split:
            problems.append(f"{where.split}; {_serving_note(where)}; fix: {_fix(model, where)}")
    history = ledger.entries(client, model, include_all=True)
    now = _lock.server_now(client)
    for entry in history:
        if entry.outcome == ledger.INTERRUPTED:
            problems.append(
                f"the {entry.action} of version {entry.version} to {entry.to_stage} "
                f"started {_ago(entry.time, now)} was interrupted (ledger run {entry.run_id}); "
                "re-run the same command, or `stageflow status --repair`"
            )
    broken, note = ledger.verify(history, ledger.head(client, model))
    problems += broken
    # Files changed in the store since registration: refused at their next load.
    held = {version for where in placed.values() for version in where.held}
    for version in sorted(held, key=int):
        if found := manifest.check_store(client, model, version):
            problems.append(found)
    done = [e for e in history if e.outcome == ledger.DONE]
    return Status(
        model=model,
        production=placed[PRODUCTION].version,
        staging=placed[STAGING].version,
        aliases={where.alias: where.aliased for where in placed.values()},
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
        notes=[note] if note else [],
    )


def _fix(model: str, where) -> str:
    """The command that settles a split stage."""
    if not where.ledgered_split:
        return (
            f"`stageflow status --model {model} --repair` (the alias follows the stage, "
            "recorded in the ledger)"
        )
    if where.stage == PRODUCTION and where.ledgered:
        return (
            f"`stageflow rollback --model {model} --to {where.ledgered}` (back to the version "
            "the ledger put there), or promote another through Staging"
        )
    return f"`stageflow promote --model {model} --version V --to {where.stage}` (gated, recorded)"


def _serving_note(where) -> str:
    if where.stage != PRODUCTION:
        return "it is not warmed for promotion until this is fixed"
    return "serve keeps the version it serves until this is fixed"


def history(model: str, tracking_uri: str | None = None) -> list[ledger.Entry]:
    """Every transition that happened to ``model``, in the order the ledger numbered them."""
    return checked_history(model, tracking_uri)[0]


def checked_history(
    model: str, tracking_uri: str | None = None
) -> tuple[list[ledger.Entry], list[str], str]:
    """The transitions of ``model``, what is wrong with the ledger's chain, and a note.

    Returns:
        The done transitions, oldest first; one line per missing, altered or repeated
        entry (:func:`registry.ledger.verify`); and a note when older entries predate
        the chain ("" otherwise).
    """
    client = tracking.client(tracking_uri)
    require_model(client, model)
    everything = ledger.entries(client, model, include_all=True)
    problems, note = ledger.verify(everything, ledger.head(client, model))
    return [e for e in everything if e.outcome == ledger.DONE], problems, note


def _ago(seconds: float, now: float) -> str:
    delta = max(0, now - seconds)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
