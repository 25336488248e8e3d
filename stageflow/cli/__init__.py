"""``stageflow``: the command line, a thin door over the packages' functions.

One module per command group, each holding its options, its handler and its output;
this module assembles them and runs one. Exit codes (DESIGN.md): 0 success; 1 refused
or failed; 2 bad usage or bad input. Errors are one line on stderr that names the
problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from stageflow.cli import (
    demo,
    loop,
    monitor,
    policy,
    promote,
    score,
    serve,
    server,
    status,
    train,
)
from stageflow.cli._common import EPILOG_TRACKING, Parser, formatter
from stageflow.errors import StageflowError

__all__ = ["build_parser", "main"]

# In the order `stageflow --help` lists them.
COMMAND_GROUPS = (server, train, promote, status, policy, serve, score, monitor, loop, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stageflow",
        formatter_class=formatter,
        description=(
            "Train, register, promote, serve and roll back tabular models on MLflow.\n\n"
            "A typical day:\n"
            "  stageflow server start --detach\n"
            "  stageflow train --data builtin:wine --target target --model-name wine --family rf\n"
            "  stageflow tune --data builtin:wine --target target --model-name wine --n-trials 30 "
            "--workers 2\n"
            "  stageflow promote --model wine --version 1 --to Staging --reason 'first model'\n"
            "  stageflow promote --model wine --version 1 --to Production\n"
            "  stageflow serve --model wine --port 8080          # in another terminal\n"
            "  stageflow rollback --model wine --reason 'v2 misbehaves'\n"
            "  stageflow status --model wine; stageflow history --model wine"
        ),
        epilog=EPILOG_TRACKING,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for ours in ("stageflow", "experiments", "registry", "serving", "monitoring"):
        logging.getLogger(ours).setLevel(level)
    # MLflow configures its own handler at INFO; its chatter is not the user's business.
    logging.getLogger("mlflow").setLevel(logging.DEBUG if verbose else logging.WARNING)


def quiet_mlflow() -> None:
    """MLflow prints run URLs to stdout and progress bars to stderr; --json needs clean stdout."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_PRINT_MODEL_URLS_ON_CREATION", "false")
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(mlflow|sklearn|matplotlib)")


def _permission_denied(exc: Exception) -> bool:
    """An MLflow call the auth app refused (403), however MLflow's client phrased it."""
    return getattr(exc, "error_code", "") == "PERMISSION_DENIED" or "error code 403" in str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, quiet=getattr(args, "json", False))
    quiet_mlflow()
    started = time.perf_counter()
    try:
        code = args.handler(args)
    except StageflowError as exc:
        print(f"stageflow {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"stageflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, and the full trace only with -v
        if args.verbose:
            raise
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        if _permission_denied(exc):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
            print(
                f"stageflow {args.command}: the tracking server refused {user} "
                f"(permission denied: {first[:160]}); an admin grants what a command needs "
                "with `stageflow server user add USER --role reader|operator|promoter --model M`",
                file=sys.stderr,
            )
            return 1
        print(
            f"stageflow {args.command}: failed: {type(exc).__name__}: {first} "
            "(re-run with -v for details)",
            file=sys.stderr,
        )
        return 1
    logging.getLogger(__name__).debug("%s took %.1fs", args.command, time.perf_counter() - started)
    return code
