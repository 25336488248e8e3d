"""``stageflow score``: a batch input through the Production version, locally or on Spark."""

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
from stageflow.errors import UsageError

# Kept here (not imported from serving.batch) so `--help` and parsing stay light.
ENGINES = ("local", "spark")
ON_INVALID = ("fail", "mark")


def add_commands(commands) -> None:
    score = commands.add_parser(
        "score",
        help="score a CSV / Parquet input with the Production version (locally or on Spark)",
        description=(
            "Score an input with the Production version (or --version V); the output has the "
            "input's columns plus `prediction` and `model_version` (and `guard_problem` when "
            "refused rows are marked). --engine local reads one file in chunks; --engine spark "
            "runs the same model as mlflow.pyfunc.spark_udf over a file or a directory of "
            "parts and writes Parquet parts (needs `pip install 'stageflow[spark]'` and Java). "
            "A run in the stageflow-batch experiment records engine, rows, refused rows by "
            "problem, seconds, version and the input's digest."
        ),
        epilog=EPILOG_TRACKING,
    )
    score.set_defaults(handler=run)
    score.add_argument("--model", required=True, metavar="NAME")
    score.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help=".csv or .parquet (spark: also a directory of parts)",
    )
    score.add_argument(
        "--output",
        required=True,
        metavar="PATH",
        help=".csv or .parquet (spark: a new directory of Parquet parts)",
    )
    score.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: one file in chunks on this machine; spark: mlflow.pyfunc.spark_udf on "
        "--spark-master (default: local)",
    )
    score.add_argument(
        "--spark-master",
        metavar="URL",
        type=optional_text,
        help="Spark's master URL, e.g. spark://host:7077 or yarn (default: local[*])",
    )
    score.add_argument(
        "--version",
        metavar="V",
        type=optional_text,
        help="score with this version instead of the Production one",
    )
    score.add_argument(
        "--on-invalid",
        type=optional_text,
        metavar="fail|mark",
        help="a row the model's contract refuses: fail stops the job naming it; mark gives it "
        "a null prediction and the problem in guard_problem (default: fail locally, mark on "
        "Spark)",
    )
    score.add_argument(
        "--id-column",
        metavar="C",
        type=optional_text,
        help="the column that identifies rows: kept in the output and logged as each row's id",
    )
    score.add_argument(
        "--chunk-rows", type=positive_int, default=50_000, help="rows per chunk (default 50000)"
    )
    add_guard_policies(score)
    add_tracking(score)
    add_json(score)


def optional_text(text: str) -> str | None:
    """A value, or None for "" (MLproject cannot omit a flag)."""
    return text if text.strip() else None


def run(args) -> int:
    if args.engine == "spark":  # what to install comes before any server is needed
        from serving.batch import require_spark  # noqa: PLC0415

        require_spark()
    require_server_first(args)
    from serving.batch import score  # noqa: PLC0415

    if args.on_invalid is not None and args.on_invalid not in ON_INVALID:
        raise UsageError(f"--on-invalid {args.on_invalid!r}: choose one of {', '.join(ON_INVALID)}")
    result = score(
        args.model,
        args.input,
        args.output,
        args.tracking_uri,
        args.chunk_rows,
        model_config=guard_config(args),
        engine=args.engine,
        version=args.version,
        on_invalid=args.on_invalid,
        id_column=args.id_column,
        spark_master=args.spark_master,
        progress=not args.json,  # stderr; --json runs stay quiet
    )
    refused = sum(result.refused.values())
    marked = f", {refused} refused and marked" if refused else ""
    human = (
        f"scored {result.rows} rows{marked} with {result.model} version {result.version} "
        f"on {result.engine} in {result.seconds:.1f}s → {result.output}"
    )
    emit(args, result.to_json(), human)
    return 0
