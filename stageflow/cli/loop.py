"""``stageflow watch`` and ``stageflow retrain``: the closed loop over monitoring's alarms."""

from __future__ import annotations

import sys

from stageflow import durations
from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_json,
    add_tracking,
    checked,
    emit,
    formatter,
)


def add_commands(commands) -> None:
    watch = commands.add_parser(
        "watch",
        help="run the monitor every period and act on its alarms (rollback, retrain)",
        formatter_class=formatter,
        description=(
            "Every --every, run the monitor over the last period and act on its alarms per "
            "the model's policy (`monitoring:` in `stageflow policy show`):\n"
            "  rollback  Production's live metric worse than allowed, or an SLO broken for "
            "slo.windows\n"
            "            consecutive windows → rollback as actor stageflow-watch (ledgered, "
            "with the\n"
            "            monitoring run); the version left is marked and never an automatic "
            "target again;\n"
            "            none again within rollback.cooldown\n"
            "  retrain   a drift alarm (retrain.on_drift) or retrain.min_new_labels labelled "
            "rows →\n"
            "            `stageflow retrain` (candidate to Staging through its gate)\n\n"
            "Example (one window, nothing changed):\n"
            "  stageflow watch --model wine --once --dry-run"
        ),
        epilog=EPILOG_TRACKING,
    )
    watch.set_defaults(handler=run_watch)
    watch.add_argument("--model", required=True, metavar="NAME")
    watch.add_argument(
        "--every",
        type=checked(durations.positive),
        default="1h",
        metavar="DURATION",
        help="period and window, like 15m, 1h, 1h30m or 1d (default 1h)",
    )
    watch.add_argument(
        "--act",
        default="rollback,retrain",
        metavar="ACTIONS",
        help="what it may do: rollback, retrain or both (default rollback,retrain)",
    )
    watch.add_argument("--once", action="store_true", help="one window, then exit (for cron)")
    watch.add_argument(
        "--dry-run", action="store_true", help="print what would be done; change nothing"
    )
    add_tracking(watch)

    retrain = commands.add_parser(
        "retrain",
        help="retrain Production's recipe on new labelled rows; the candidate goes to Staging",
        formatter_class=formatter,
        description=(
            "Retrain with the Production version's own recipe (family, hyperparameters, seed, "
            "target, task -- read from its run) on its training data plus the labelled rows of "
            "the inference log (`stageflow feedback`), or plus --data. The candidate is "
            "registered with its lineage as tags (trigger, parent version, data digests) and "
            "promoted to Staging through the gate; to Production only through its gate, and "
            "automatically only where the policy says monitoring.auto_promote: true. A refused "
            "candidate stays registered (stage None) and the command exits 1.\n\n"
            "Example:\n"
            "  stageflow retrain --model wine --data new-labelled-rows.parquet"
        ),
        epilog=EPILOG_TRACKING,
    )
    retrain.set_defaults(handler=run_retrain)
    retrain.add_argument("--model", required=True, metavar="NAME")
    retrain.add_argument(
        "--data",
        default="",
        metavar="SOURCE",
        help="labelled rows (with the target column) to add instead of the inference log's",
    )
    add_tracking(retrain)
    add_json(retrain)


def run_watch(args) -> int:
    from monitoring.watch import parse_acts, summary, watch  # noqa: PLC0415

    acts = parse_acts(args.act)

    def show(report) -> None:
        print(summary(report), flush=True)

    watch(
        args.model,
        every=args.every,
        acts=acts,
        once=args.once,
        dry_run=args.dry_run,
        tracking_uri=args.tracking_uri,
        on_report=show,
    )
    return 0


def run_retrain(args) -> int:
    from experiments.retrain import retrain, summary  # noqa: PLC0415

    result = retrain(args.model, args.data or None, tracking_uri=args.tracking_uri)
    emit(args, result.to_json(), summary(result))
    if result.refused:
        print(f"stageflow retrain: {result.staging.get('detail', 'refused')}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_commands"]
