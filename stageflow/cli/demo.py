"""``stageflow demo``: the whole story on a built-in data set."""

from __future__ import annotations

from stageflow.cli._common import port


def add_commands(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole story on a built-in data set, then clean up",
        description=(
            "Start a tracking server, train two versions, promote, serve, switch, roll back and "
            "score a batch file -- printing each step -- then stop everything it started."
        ),
    )
    demo.set_defaults(handler=run)
    demo.add_argument("--port", type=port, default=5000, help="tracking server port")
    demo.add_argument("--serve-port", type=port, default=8080, help="front door port")


def run(args) -> int:
    from stageflow.demo import run_demo  # noqa: PLC0415

    return run_demo(tracking_port=args.port, serve_port=args.serve_port)
