"""``stageflow feedback`` and ``stageflow monitor``: labels in, drift and live metrics out."""

from __future__ import annotations

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
    feedback = commands.add_parser(
        "feedback",
        help="store labels that arrived after the answers, to judge live performance",
        description=(
            "Store labels for served rows. The file (CSV or Parquet) names each row by the\n"
            "serving id column (--id-column, as given to `serve --id-column`) or by\n"
            "request_id (+ row, default 0: the X-Request-Id answers carry), and holds the\n"
            "model's target column. Ids the inference log does not hold are counted and\n"
            "reported, and kept.\n\n"
            "Examples:\n"
            "  stageflow feedback --model churn --labels outcomes.csv --id-column order_id\n"
            "  stageflow feedback --model churn --labels labels.parquet --json"
        ),
        formatter_class=formatter,
        epilog=EPILOG_TRACKING,
    )
    feedback.set_defaults(handler=run_feedback)
    feedback.add_argument("--model", required=True, metavar="NAME")
    feedback.add_argument("--labels", required=True, metavar="FILE", help="a .csv or .parquet")
    feedback.add_argument(
        "--id-column",
        metavar="NAME",
        help="the file's column holding the serving id column's values "
        "(default: request_id (+ row) if present, else id)",
    )
    add_tracking(feedback)
    add_json(feedback)

    monitor = commands.add_parser(
        "monitor",
        help="drift, live metrics and alarms per served version, as MLflow runs",
        description=(
            "For each version that answered in the window: traffic (rows, requests, refusal\n"
            "and flag rates by problem, latency p50/p99), input drift per column and\n"
            "prediction drift against the version's reference (PSI with KS or chi-square),\n"
            "the live metric from stored labels with a bootstrap interval, and the alarms\n"
            "the policy's monitoring: thresholds raise. Each version's window is recorded\n"
            "as a run in the stageflow-monitoring experiment (metrics, report, plots).\n\n"
            "Examples:\n"
            "  stageflow monitor --model churn\n"
            "  stageflow monitor --model churn --since 7d --json\n"
            "  stageflow monitor --model churn --since 15m --fail-on-alarm   # for schedulers"
        ),
        formatter_class=formatter,
        epilog=EPILOG_TRACKING,
    )
    monitor.set_defaults(handler=run_monitor)
    monitor.add_argument("--model", required=True, metavar="NAME")
    monitor.add_argument(
        "--since",
        type=checked(durations.positive),
        default="1h",
        metavar="DURATION",
        help="the window, ending now: like 90s, 15m, 2h, 7d (default: 1h)",
    )
    monitor.add_argument(
        "--fail-on-alarm", action="store_true", help="exit 1 when any alarm is raised"
    )
    add_tracking(monitor)
    add_json(monitor)


def run_feedback(args) -> int:
    from monitoring import feedback  # noqa: PLC0415

    result = feedback(args.model, args.labels, args.id_column or None, args.tracking_uri)
    key = " + ".join(result.key)
    lines = [
        f"stored {result.rows} labels for {args.model} (joined on {key}; run {result.run_id})",
        f"  {result.matched} name rows in the inference log",
    ]
    if result.unknown:
        lines.append(
            f"  {result.unknown} name rows the log does not hold (yet), e.g. "
            + ", ".join(result.unknown_examples)
        )
    emit(args, result.to_json(), "\n".join(lines))
    return 0


def run_monitor(args) -> int:
    from monitoring import monitor  # noqa: PLC0415

    result = monitor(args.model, since=args.since, tracking_uri=args.tracking_uri)
    emit(args, result.to_json(), _text(result))
    return 1 if args.fail_on_alarm and result.alarm else 0


def _text(result) -> str:
    lines = [
        f"{result.model}, {result.window.label()} (policy: {result.policy_source})",
    ]
    if not result.versions:
        lines.append("  no version answered in this window")
    for v in result.versions:
        lines.append(
            f"  v{v.version} ({v.role}): {v.rows} rows, {v.requests} requests, refusal "
            f"{v.refusal_rate:.1%}, flagged {v.flag_rate:.1%}, latency p50 "
            f"{_ms(v.latency_p50_ms)} / p99 {_ms(v.latency_p99_ms)}"
        )
        lines.append(
            "    drifted columns: "
            + (", ".join(v.drifted_columns) or "none")
            + f"; prediction drift: {'yes' if v.prediction_drift else 'no'}"
        )
        if v.live:
            lines.append(
                f"    live {v.live.metric} {v.live.value:.4g} [{v.live.low:.4g}, "
                f"{v.live.high:.4g}] on {v.live.rows} labels (test {v.live.test_value})"
            )
        for note in v.notes:
            lines.append(f"    note: {note}")
        for alarm in v.alarms:
            lines.append(f"    ALARM: {alarm}")
        lines.append(f"    run {v.run_id}")
    shadow = result.shadow
    if shadow is not None and shadow.improvement is not None:
        lines.append(
            f"  shadow: v{shadow.shadow} vs v{shadow.production} on {shadow.rows} labelled live "
            f"rows: {shadow.metric} {shadow.shadow_value:.4g} vs {shadow.production_value:.4g}, "
            f"improvement {shadow.improvement:+.4f} [{shadow.low:+.4f}, {shadow.high:+.4f}], "
            f"agreement {shadow.agreement:.1%}"
        )
    elif shadow is not None:
        lines.append(f"  shadow: v{shadow.shadow} vs v{shadow.production}: {shadow.note}")
    return "\n".join(lines)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"
