"""``stageflow serve``: the Production version over REST, following the registry."""

from __future__ import annotations

from serving.log_options import parse_mode, parse_retention
from stageflow.cli._common import (
    EPILOG_TRACKING,
    add_guard_policies,
    add_tracking,
    checked,
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
            "serve. Every /invocations answer carries X-Model-Version and X-Request-Id, and is "
            "recorded in the version's inference log (README, Monitoring). Ctrl-C stops "
            "everything it started."
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
        "--id-column",
        metavar="NAME",
        help="a column of the client's own key (an order number) that requests may carry: "
        "never fed to the model, never refused as unexpected, logged as `id` so labels can "
        "be joined on it",
    )
    serve.add_argument(
        "--inference-log",
        type=checked(parse_mode),
        default="all",
        metavar="off|sample:FRACTION|all",
        help="which requests the inference log records: none, a random fraction (e.g. "
        "sample:0.1) or every one (default: all)",
    )
    serve.add_argument(
        "--log-retention",
        type=checked(parse_retention),
        default="1GB,7d",
        metavar="SIZE,AGE",
        help="bound on the log's local segments, by total size and/or age, e.g. 500MB,7d or "
        "2d; uploaded segments stay in the artifact store (default: 1GB,7d)",
    )
    serve.add_argument(
        "--max-rows",
        type=positive_int,
        metavar="N",
        help="rows one request may hold; more is answered 413, pointing at `stageflow score` "
        "for batch scoring (default: 10000)",
    )
    serve.add_argument(
        "--max-concurrency",
        type=positive_int,
        metavar="N",
        help="requests each replica answers at once; more are answered 503 with Retry-After "
        "(default: 16)",
    )
    serve.add_argument(
        "--shadow",
        action="store_true",
        help="mirror every request Production answers (and logs) to the warm Staging version, "
        "after the answer is sent: its predictions are logged beside Production's "
        "(source=shadow) for `stageflow monitor` and the gate to Production; the client's "
        "answer never depends on it (README, Automatic rollback and retraining)",
    )
    serve.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Caddy's Prometheus metrics on 127.0.0.1:PORT/metrics (default: a free port, "
        "logged at start)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per request: the front door's access.log (rolled at 10 MiB, 3 kept) "
        "and each model server's log (capped at 10 MiB); off by default, so logs stay small "
        "under load",
    )
    add_tracking(serve)


def run(args) -> int:
    from serving import inference_log  # noqa: PLC0415
    from serving.controller import serve  # noqa: PLC0415

    log = {"mode": args.inference_log, "retention": args.log_retention}
    # Unset: the replicas' own defaults (serving/_admission.py).
    for limit in ("max_rows", "max_concurrency"):
        if getattr(args, limit) is not None:
            log[limit] = getattr(args, limit)
    if args.id_column:
        log["id_column"] = args.id_column
    serve(
        args.model,
        port=args.port,
        tracking_uri=args.tracking_uri,
        metrics_port=args.metrics_port,
        replicas=args.replicas,
        model_config={**guard_config(args), inference_log.INFERENCE_LOG: log},
        access_log=args.access_log,
        shadow=args.shadow,
    )
    return 0
