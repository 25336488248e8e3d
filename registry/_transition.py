"""One transition, the same way for promote and rollback: gates, ledger, move, ledger."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from mlflow import MlflowClient

from registry import gates, ledger
from registry._stages import current_version, move
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
        }


def transition(
    client: MlflowClient,
    model: str,
    version,
    to_stage: str,
    action: str,
    checks: tuple[gates.Check, ...],
    reason: str,
) -> TransitionResult:
    """Gate, record and perform moving ``version`` of ``model`` to ``to_stage``.

    Raises:
        Refused: a check failed (recorded in the ledger as refused; registry untouched).
        StageflowError: the registry refused the move (recorded as failed).
    """
    result = TransitionResult(
        model=model,
        version=str(version.version),
        from_stage=version.current_stage,
        to_stage=to_stage,
        action=action,
        changed=False,
        reason=reason,
    )
    entry = ledger.begin(
        client,
        ledger.Entry(
            model=model,
            version=result.version,
            from_stage=result.from_stage,
            to_stage=to_stage,
            action=action,
            actor=ledger.actor(),
            reason=reason,
        ),
    )
    result.ledger_run_id = entry.run_id
    try:
        result.checks = gates.run(gates.GateContext(client, model, version, to_stage), checks)
        evidence = {"checks": [c.to_json() for c in result.checks]}
        failed = [c for c in result.checks if not c.passed]
        if failed:
            why = "; ".join(f"{c.check}: {c.detail}" for c in failed)
            ledger.finish(client, entry, ledger.REFUSED, evidence, detail=why)
            raise Refused(
                f"refused {action} of {model} version {result.version} to {to_stage}: {why}",
                result,
            )
        previous = current_version(client, model, to_stage)
        move(client, model, result.version, to_stage)
    except Refused:
        raise
    except BaseException as exc:
        # The registry may or may not have moved; the ledger says "failed", never "done".
        # If the server itself is gone the entry stays RUNNING, which status reports.
        with contextlib.suppress(Exception):
            ledger.finish(client, entry, ledger.FAILED, detail=_first_line(exc))
        raise
    result.changed = True
    if previous and previous != result.version:
        result.archived = [previous]
    entry.archived = result.archived
    ledger.finish(client, entry, ledger.DONE, evidence)
    logger.info(
        "%s version %s: %s → %s (ledger run %s)",
        model,
        result.version,
        result.from_stage,
        to_stage,
        entry.run_id,
    )
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
