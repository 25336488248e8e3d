"""One transition, the same way for promote and rollback: lock, gates, ledger, move, verify."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from mlflow import MlflowClient

from registry import _lock, gates, ledger, report
from registry._stages import (
    ALIAS_FOR_STAGE,
    alias_target,
    current_version,
    holders,
    move,
    placements,
)
from registry.policy import Policy
from registry.policy import for_model as policy_for
from registry.repair import settle
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)


class Refused(StageflowError):
    """A gate said no; nothing changed."""

    def __init__(self, message: str, result: TransitionResult):
        super().__init__(message)
        self.result = result


@dataclass
class TransitionResult:
    model: str
    version: str
    from_stage: str
    to_stage: str
    action: str
    changed: bool
    archived: list[str] = field(default_factory=list)
    checks: list[gates.CheckResult] = field(default_factory=list)
    ledger_run_id: str = ""
    reason: str = ""
    dry_run: bool = False
    report: dict = field(default_factory=dict)
    report_uri: str = ""
    repaired: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "action": self.action,
            "changed": self.changed,
            "archived": self.archived,
            "checks": [c.to_json() for c in self.checks],
            "ledger_run_id": self.ledger_run_id,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "policy": self.report.get("policy", {}).get("source", ""),
            "report": self.report_uri,
            "repaired": self.repaired,
        }


def transition(
    client: MlflowClient,
    model: str,
    version,
    to_stage: str,
    action: str,
    checks: tuple[gates.Check, ...],
    reason: str,
    policy: Policy | None = None,
    allow_breaking: str = "",
    dry_run: bool = False,
    evidence_run: str = "",
) -> TransitionResult:
    """Gate, record and perform moving ``version`` of ``model`` to ``to_stage``.

    Under the model's registry lock (``registry._lock``): settle what an earlier
    fault left (``registry.repair``), re-read the version, stop if the move already
    happened, open the ledger entry, run the gates, write the gate report, move,
    read the registry back and repair it if it disagrees, close the entry. A dry
    run takes no lock and runs only the gates.

    Raises:
        Refused: a check failed (recorded in the ledger as refused; registry untouched).
        StageflowError: the registry refused the move (recorded as failed), or the lock
            could not be had.
    """
    policy = policy or policy_for(client, model)
    if dry_run:
        return _dry_run(
            client, model, version, to_stage, action, checks, reason, policy, allow_breaking
        )
    lease = _lock.acquire(client, model, ledger.actor())
    try:
        repaired = settle(client, model, lease, f"repaired before {action} of v{version.version}")
        version = client.get_model_version(model, str(version.version))
        result = _result(model, version, to_stage, action, reason)
        result.repaired = repaired
        if _already_there(client, model, version, to_stage):
            return result
        return _transition_locked(
            client, lease, result, version, checks, policy, allow_breaking, evidence_run
        )
    finally:
        lease.release()


def _transition_locked(
    client, lease, result, version, checks, policy, allow_breaking, evidence_run=""
):
    model, to_stage, action = result.model, result.to_stage, result.action
    entry = ledger.begin(
        client,
        ledger.Entry(
            model=model,
            version=result.version,
            from_stage=result.from_stage,
            to_stage=to_stage,
            action=action,
            actor=ledger.actor(),
            reason=result.reason,
            evidence_run=evidence_run,
        ),
        lease,
    )
    result.ledger_run_id = entry.run_id
    try:
        ctx = gates.GateContext(
            client, model, version, to_stage, policy, allow_breaking, entry.run_id
        )
        failed = _judge(result, ctx, checks, entry.actor)
        ledger.log_report(client, entry, result.report, report.markdown(result.report))
        result.report_uri = entry.report
        report.annotate_version(client, result.report, entry.report)
        if failed:
            why = _why(failed)
            ledger.finish(client, entry, ledger.REFUSED, detail=why)
            raise Refused(
                f"refused {action} of {model} version {result.version} to {to_stage}: {why}",
                result,
            )
        previous = current_version(client, model, to_stage)
        lease.ensure()
        move(client, model, result.version, to_stage)
        _verify(client, model, result.version, to_stage, lease)
    except Refused:
        raise
    except BaseException as exc:
        # The registry may or may not have moved; the ledger says "failed", never "done".
        # If the server itself is gone the entry stays RUNNING: status reports it, and the
        # next promotion (or `stageflow status --repair`) settles it from what the registry shows.
        with contextlib.suppress(Exception):
            ledger.finish(client, entry, ledger.FAILED, detail=_first_line(exc))
        raise
    result.changed = True
    if previous and previous != result.version:
        result.archived = [previous]
    entry.archived = result.archived
    ledger.finish(client, entry, ledger.DONE)
    logger.info(
        "%s version %s: %s → %s (ledger run %s)",
        model,
        result.version,
        result.from_stage,
        to_stage,
        entry.run_id,
    )
    return result


def _dry_run(client, model, version, to_stage, action, checks, reason, policy, allow_breaking):
    result = _result(model, version, to_stage, action, reason)
    result.dry_run = True
    if _already_there(client, model, version, to_stage):
        return result
    ctx = gates.GateContext(client, model, version, to_stage, policy, allow_breaking, seal=False)
    failed = _judge(result, ctx, checks, ledger.actor(), dry_run=True)
    if failed:
        raise Refused(
            f"dry run: would refuse {action} of {model} version {result.version} to "
            f"{to_stage}: {_why(failed)}",
            result,
        )
    return result


def _judge(result, ctx, checks, actor: str, dry_run: bool = False) -> list[gates.CheckResult]:
    """Run the gate's checks, build the report into ``result``; return the failed checks."""
    result.checks = gates.run(ctx, checks)
    result.report = report.build(
        result.model,
        result.version,
        result.from_stage,
        result.to_stage,
        result.action,
        actor,
        result.reason,
        ctx.policy,
        result.checks,
        ctx.allow_breaking,
        dry_run=dry_run,
    )
    return [c for c in result.checks if not c.passed]


def _why(failed: list[gates.CheckResult]) -> str:
    return "; ".join(f"{c.check}: {c.detail}" for c in failed)


def _result(model, version, to_stage, action, reason) -> TransitionResult:
    return TransitionResult(
        model=model,
        version=str(version.version),
        from_stage=version.current_stage,
        to_stage=to_stage,
        action=action,
        changed=False,
        reason=reason,
    )


def _already_there(client, model: str, version, to_stage: str) -> bool:
    """The move already happened (stage, alias and ledger agree): repeating it changes nothing.

    A version put there outside Stageflow is not "there": promoting it runs its gates
    and records it, which settles the stage.
    """
    if version.current_stage != to_stage:
        return False
    return placements(client, model)[to_stage].version == str(version.version)


def _verify(client, model: str, version: str, stage: str, lease) -> None:
    """Read the registry back; if it disagrees with the move just made, repair and re-check."""
    if _consistent(client, model, version, stage):
        return
    logger.warning("%s: the registry disagrees after moving v%s; repairing", model, version)
    settle(client, model, lease, f"verify after moving v{version} to {stage}")
    if not _consistent(client, model, version, stage):
        raise StageflowError(
            f"moving {model} version {version} to {stage} did not stick; "
            "see `stageflow status` and re-run the command"
        )


def _consistent(client, model: str, version: str, stage: str) -> bool:
    held = [str(v.version) for v in holders(client, model, stage)]
    return held == [version] and alias_target(client, model, ALIAS_FOR_STAGE[stage]) == version


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
