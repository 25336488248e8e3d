"""``stageflow promote`` and ``stageflow rollback``: stage moves through the gates."""

from __future__ import annotations

import json

from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_json,
    add_tracking,
    emit,
    formatter,
    optional_positive_int,
    positive_int,
)
from stageflow.errors import UsageError


def add_commands(commands) -> None:
    promote = commands.add_parser(
        "promote",
        help="move a version to Staging or Production through its gate",
        formatter_class=formatter,
        description=(
            "Move a version into Staging or Production if its gate passes; the previous holder "
            "is archived and the stage's alias (challenger / champion) follows. Production is "
            "entered only from Staging. Every transition goes into the ledger.\n\n"
            "Gates (numbers from the model's policy, see `stageflow policy show`):\n"
            "  Staging:    loads and predicts its input example; test-metric thresholds;\n"
            "              input schema compatible with Production; predict latency budget\n"
            "  Production: from Staging; loads and predicts; thresholds; schema; not worse\n"
            "              than the champion on the challenger's test split (paired bootstrap)\n"
            "A refusal names the failed check and its numbers and exits 1.\n\n"
            "Example:\n"
            "  stageflow promote --model wine --version 3 --to Production --dry-run"
        ),
        epilog=EPILOG_TRACKING,
    )
    promote.set_defaults(handler=run_promote)
    promote.add_argument("--model", required=True, metavar="NAME")
    promote.add_argument("--version", required=True, type=positive_int, metavar="V")
    promote.add_argument("--to", required=True, metavar="STAGE", help="Staging or Production")
    promote.add_argument("--reason", default="", metavar="TEXT", help="why (kept in the ledger)")
    promote.add_argument(
        "--dry-run", action="store_true", help="run the gates and report; change nothing"
    )
    promote.add_argument(
        "--allow-breaking",
        metavar="REASON",
        help="accept an input-schema change that breaks Production's clients, saying why",
    )
    promote.add_argument(
        "--policy", metavar="FILE", help="YAML/JSON policy for this promotion (default: model's)"
    )
    add_tracking(promote)
    add_json(promote)

    rollback = commands.add_parser(
        "rollback",
        help="put the previous Production version back",
        description=(
            "Return Production to the version that held it before the current one (from the "
            "ledger), or to --to V. The current version is archived; the rollback is recorded."
        ),
        epilog=EPILOG_TRACKING,
    )
    rollback.set_defaults(handler=run_rollback)
    rollback.add_argument("--model", required=True, metavar="NAME")
    rollback.add_argument(
        "--to", type=optional_positive_int, metavar="V", help="a specific version"
    )
    rollback.add_argument("--reason", default="", metavar="TEXT", help="why (kept in the ledger)")
    add_tracking(rollback)
    add_json(rollback)


def transition_lines(result) -> str:
    """A transition's outcome as the lines a person reads: the move, each check, the records."""
    if not result.changed:
        return (
            f"{result.model} version {result.version} is already in {result.to_stage}; "
            "nothing to do"
        )
    lines = [f"  repaired first: {line}" for line in getattr(result, "repaired", [])]
    if getattr(result, "dry_run", False):
        lines.insert(0, f"dry run: {result.model} version {result.version} would pass the gate")
    else:
        lines.insert(
            0,
            f"{result.model} version {result.version}: {result.from_stage} → {result.to_stage}"
            + (f" (archived version {', '.join(result.archived)})" if result.archived else ""),
        )
    for check in result.checks:
        lines.append(f"  {'✓' if check.passed else '✗'} {check.check}: {check.detail}")
    if getattr(result, "report_uri", ""):
        lines.append(f"  report: {result.report_uri}")
    if result.ledger_run_id:
        lines.append(f"  ledger: {result.ledger_run_id}")
    return "\n".join(lines)


def run_promote(args) -> int:
    from registry import Refused, promote  # noqa: PLC0415

    if args.allow_breaking is not None and not args.allow_breaking.strip():
        raise UsageError("--allow-breaking needs a reason, e.g. --allow-breaking 'clients moved'")
    try:
        result = promote(
            args.model,
            args.version,
            args.to,
            args.reason,
            args.tracking_uri,
            dry_run=args.dry_run,
            allow_breaking=args.allow_breaking or "",
            policy_file=args.policy,
        )
    except Refused as refused:
        if args.json:  # scripts get the whole report; the one-line reason still goes to stderr
            print(json.dumps(refused.result.to_json() | {"refused": True}, default=str))
        raise
    emit(args, result.to_json(), transition_lines(result))
    return 0


def run_rollback(args) -> int:
    from registry import rollback  # noqa: PLC0415

    result = rollback(args.model, args.to, args.reason, args.tracking_uri)
    emit(args, result.to_json(), transition_lines(result))
    return 0
