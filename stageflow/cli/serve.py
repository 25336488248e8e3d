"""``stageflow serve``: the Production version over REST, following the registry."""

from __future__ import annotations

from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_guard_policies,
    add_tracking,
    guard_config,
    port,
    positive_int,
)


def add_commands(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the Production version over REST, following promotions and rollbacks",
        description=(
            "Serve the Production version behind a front door on 127.0.0.1:PORT. The controller "
            "polls the registry; a promotion or rollback switches what is served within seconds, "
            "without a restart. The previous Production stays warm for a rollback, and the "
            "Staging version is started ahead of its promotion, so either switch is immediate. "
            "Each version runs as several replicas; one that dies is restarted while the others "
            "serve. Every /invocations answer carries X-Model-Version. Ctrl-C stops everything "
            "it started."
        ),
        epilog=EPILOG_TRACKING,
    )
    serve.set_defaults(handler=run)
    serve.add_argument("--model", required=True, metavar="NAME")
    serve.add_argument("--port", type=port, default=8080, help="public port (default 8080)")
    serve.add_argument(
        "--replicas",
        type=positive_int,
        metavar="N",
        help="model server processes per live version, balanced by the front door (default: "
        "this machine's CPU cores, at most 4). Each answers on one thread, so one per core "
        "uses the machine; each also holds its own copy of the model, for the served version, "
        "its rollback standby and the warm Staging version alike, hence the cap",
    )
    add_guard_policies(serve)
    serve.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Caddy's Prometheus metrics on 127.0.0.1:PORT/metrics (default: a free port, "
        "logged at start)",
    )
    add_tracking(serve)


def run(args) -> int:
    from serving.controller import serve  # noqa: PLC0415

    serve(
        args.model,
        port=args.port,
        tracking_uri=args.tracking_uri,
        metrics_port=args.metrics_port,
        replicas=args.replicas,
        model_config=guard_config(args),
    )
    return 0
