"""``stageflow score``: a batch file through the Production version."""

from __future__ import annotations

from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_guard_policies,
    add_json,
    add_tracking,
    emit,
    guard_config,
    positive_int,
    require_server_first,
)


def add_commands(commands) -> None:
    score = commands.add_parser(
        "score",
        help="score a CSV / Parquet file with the Production version",
        description=(
            "Score a file in chunks with the Production version; the output has the input's "
            "columns plus `prediction` and `model_version`. A run in the stageflow-batch "
            "experiment records rows, seconds, version and the input's digest."
        ),
        epilog=EPILOG_TRACKING,
    )
    score.set_defaults(handler=run)
    score.add_argument("--model", required=True, metavar="NAME")
    score.add_argument("--input", required=True, metavar="PATH", help=".csv or .parquet")
    score.add_argument("--output", required=True, metavar="PATH", help=".csv or .parquet")
    score.add_argument(
        "--chunk-rows", type=positive_int, default=50_000, help="rows per chunk (default 50000)"
    )
    add_guard_policies(score)
    add_tracking(score)
    add_json(score)


def run(args) -> int:
    require_server_first(args)
    from serving.batch import score  # noqa: PLC0415

    result = score(
        args.model,
        args.input,
        args.output,
        args.tracking_uri,
        args.chunk_rows,
        model_config=guard_config(args),
        progress=not args.json,  # stderr; --json runs stay quiet
    )
    human = (
        f"scored {result.rows} rows with {result.model} version {result.version} "
        f"in {result.seconds:.1f}s → {result.output}"
    )
    emit(args, result.to_json(), human)
    return 0
