"""``stageflow status`` and ``stageflow history``: what is where, and how it got there."""

from __future__ import annotations

from stageflow.cli._common import EPILOG_TRACKING, add_json, add_tracking, emit, version_text


def add_commands(commands) -> None:
    status = commands.add_parser(
        "status",
        help="which version is where, and anything inconsistent",
        description="which version is where, and anything inconsistent",
        epilog=EPILOG_TRACKING,
    )
    status.set_defaults(handler=run_status)
    status.add_argument("--model", required=True, metavar="NAME")
    status.add_argument(
        "--repair",
        action="store_true",
        help="fix what it flags (interrupted transitions, stages and aliases), "
        "recording each fix in the ledger",
    )
    add_tracking(status)
    add_json(status)

    history = commands.add_parser(
        "history",
        help="every stage transition: when, who, from → to, why",
        description="every stage transition: when, who, from → to, why",
        epilog=EPILOG_TRACKING,
    )
    history.set_defaults(handler=run_history)
    history.add_argument("--model", required=True, metavar="NAME")
    add_tracking(history)
    add_json(history)


def run_status(args) -> int:
    from registry import repair, status  # noqa: PLC0415

    if args.repair:
        fixed = repair(args.model, tracking_uri=args.tracking_uri)
        if not args.json:
            print("\n".join(f"repaired: {line}" for line in fixed) or "nothing to repair")
    st = status(args.model, args.tracking_uri)
    lines = [
        f"{st.model}",
        f"  Production: {version_text(st.production)}   "
        f"(@champion → {version_text(st.aliases.get('champion'))})",
        f"  Staging:    {version_text(st.staging)}   "
        f"(@challenger → {version_text(st.aliases.get('challenger'))})",
        "  versions:",
    ]
    for v in st.versions:
        lines.append(version_line(v))
    if st.last_transition:
        t = st.last_transition
        lines.append(
            f"  last change: {t['time']} {t['actor']} moved version {t['version']} "
            f"{t['from_stage']} → {t['to_stage']}" + (f" ({t['reason']})" if t["reason"] else "")
        )
    if st.lock:
        lines.append(f"  promotion in progress: lock held by {st.lock}")
    for problem in st.problems:
        lines.append(f"  ! {problem}")
    for note in st.notes:
        lines.append(f"  note: {note}")
    emit(args, st.to_json(), "\n".join(lines))
    return 0


# A version's line: four spaces, the version in four, two, the stage in ten, two.
DESCRIPTION_COLUMN = 4 + 4 + 2 + 10 + 2


def version_line(version: dict) -> str:
    """One version of ``status``; a description's later lines indented under its first."""
    first, *rest = (version["description"] or "").splitlines() or [""]
    lines = [f"    {version['version']:>4}  {version['stage']:<10}  {first}".rstrip()]
    lines += [" " * DESCRIPTION_COLUMN + line if line.strip() else "" for line in rest]
    return "\n".join(lines)


def run_history(args) -> int:
    from registry.status import checked_history  # noqa: PLC0415

    entries, problems, note = checked_history(args.model, args.tracking_uri)
    lines = [f"{args.model}: {len(entries)} transition(s), oldest first"]
    for e in entries:
        j = e.to_json()
        lines.append(
            f"  {j['time']}  {e.action:<8} v{e.version:<4} {e.from_stage:>10} → {e.to_stage:<10} "
            f"{e.actor}" + (f"  — {e.reason}" if e.reason else "")
        )
    lines += [f"  ! {problem}" for problem in problems] + ([f"  note: {note}"] if note else [])
    record = {"model": args.model, "entries": [e.to_json() for e in entries]}
    emit(args, record | {"problems": problems, "note": note}, "\n".join(lines))
    return 0
