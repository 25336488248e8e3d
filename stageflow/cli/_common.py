"""What every command of the CLI shares: the parser class, option groups, value types,
and the one way a command prints its result."""

from __future__ import annotations

import argparse
import json

EPILOG_TRACKING = (
    "The tracking server comes from --tracking-uri, else MLFLOW_TRACKING_URI, "
    "else http://127.0.0.1:5000 (the one `stageflow server start` runs)."
)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_guard_policies(parser: argparse.ArgumentParser) -> None:
    """The guarded model's policies, the same for `serve` and `score`."""
    parser.add_argument(
        "--unknown-category",
        choices=("reject", "flag"),
        default="reject",
        help="what the guarded model does with a category it never saw in training: reject "
        "refuses the row naming the column (REST: 400); flag accepts it (encoded as unseen) "
        "and counts it in the log (default: reject)",
    )
    parser.add_argument(
        "--abnormal-output",
        choices=("reject", "clip"),
        default="reject",
        help="what it does with a prediction outside the training target's range (regression) "
        "or invalid probabilities: reject refuses it (REST: 422); clip clips regression "
        "predictions into range and counts them (default: reject)",
    )


def guard_config(args) -> dict:
    return {"unknown_category": args.unknown_category, "abnormal_output": args.abnormal_output}


def add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking server (default: MLFLOW_TRACKING_URI or http://127.0.0.1:5000)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def optional_positive_int(text: str) -> int | None:
    """Like a positive int, but "" means "not given" (MLproject cannot omit a flag)."""
    return positive_int(text) if text.strip() else None


def optional_positive_float(text: str) -> float | None:
    """Seconds > 0; "" means "not given" (MLproject cannot omit a flag)."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def checked(parse):
    """An argparse type that checks its text with ``parse`` (a ValueError is the usage
    error) and keeps the text itself, for options handed on as written."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def emit(args, payload: dict, human: str) -> None:
    """Print a command's result: one JSON object with --json, else the human lines."""
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(human)


def require_server_first(args) -> None:
    """Check the tracking server before the heavy imports: an unreachable one fails in
    ~3 s rather than after ~8 s of loading scikit-learn and skops."""
    from stageflow import tracking  # noqa: PLC0415

    tracking.require_server(args.tracking_uri)


def version_text(version) -> str:
    return f"version {version}" if version else "—"
