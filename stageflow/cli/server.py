"""``stageflow server start|stop``: the local MLflow tracking server."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from stageflow.cli._common import add_json, add_tracking, emit, formatter, port


def add_commands(commands) -> None:
    server = commands.add_parser(
        "server", help="start or stop the local MLflow tracking server", formatter_class=formatter
    )
    server.set_defaults(handler=run)
    server_commands = server.add_subparsers(dest="server_command", metavar="ACTION")
    server_commands.required = True
    start = server_commands.add_parser(
        "start",
        help="start the tracking server (reuses a healthy one)",
        description=(
            "Start `mlflow server` on 127.0.0.1 with a SQLite backend (WAL mode) and proxied "
            "artifacts under $STAGEFLOW_HOME (default ./.stageflow). A second start reuses a "
            "healthy running server.\n\n"
            "Examples:\n"
            "  stageflow server start --detach\n"
            "  read -s STAGEFLOW_ADMIN_PASSWORD; export STAGEFLOW_ADMIN_PASSWORD\n"
            "  stageflow server start --auth --tls --host 0.0.0.0 \\\n"
            "      --allowed-hosts tracking.internal:5000 --detach"
        ),
        formatter_class=formatter,
    )
    start.add_argument("--port", type=port, default=5000, help="port (default 5000)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    start.add_argument("--backend-store-uri", metavar="URI", help="e.g. postgresql://user@host/db")
    start.add_argument("--artifacts-destination", metavar="URI", help="where artifacts go")
    start.add_argument(
        "--auth",
        action="store_true",
        help="require a user name and password on every call (MLflow's basic-auth app); the "
        "admin user is `admin`, its password read from STAGEFLOW_ADMIN_PASSWORD; new users "
        "have no permissions until granted (README, 'Running Stageflow for a team')",
    )
    start.add_argument(
        "--allowed-hosts",
        metavar="H,...",
        help="Host names clients may use to reach it, e.g. tracking.internal:5000 (MLflow "
        "answers 403 to others; default: localhost and private addresses)",
    )
    start.add_argument(
        "--tls",
        action="store_true",
        help="answer HTTPS only (Caddy in front, mlflow server on loopback behind it), with "
        "Caddy's internal CA: clients trust the root it prints via "
        "MLFLOW_TRACKING_SERVER_CERT_PATH. Needed for --auth off loopback: basic auth over "
        "plain HTTP sends passwords in clear text",
    )
    start.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve this certificate (implies --tls)"
    )
    start.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    start.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="bind a non-loopback --host without --auth anyway: anyone who reaches it can "
        "change what is served",
    )
    start.add_argument(
        "--detach",
        action="store_true",
        help="return once it is healthy; stop it with `server stop`",
    )
    server_commands.add_parser("stop", help="stop the tracking server started from this folder")
    user = server_commands.add_parser(
        "user",
        help="give a user of an --auth server a role on a model",
        formatter_class=formatter,
        description=(
            "On a tracking server started with --auth, create a user (password from "
            "STAGEFLOW_USER_PASSWORD) or take an existing one, and grant what a role needs "
            "on one model:\n"
            "  reader    status, history, the MLflow UI (READ on the model, its runs, the ledger)\n"
            "  operator  serve, score, monitor (a reader, plus EDIT on Stageflow's batch,\n"
            "            inference-log and monitoring experiments)\n"
            "  promoter  promote, rollback, policy set (a reader, plus MANAGE on the model,\n"
            "            EDIT on the ledger, READ on the registry locks of every model)\n"
            "Run it as an admin (MLFLOW_TRACKING_USERNAME=admin ...).\n\n"
            "Example:\n"
            "  STAGEFLOW_USER_PASSWORD=... stageflow server user add alice --role promoter "
            "--model churn"
        ),
    )
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION")
    user_commands.required = True
    add = user_commands.add_parser("add", help="create or update a user with a role on a model")
    add.add_argument("username", metavar="NAME")
    add.add_argument("--role", required=True, choices=("reader", "operator", "promoter"))
    add.add_argument("--model", required=True, metavar="MODEL")
    add_tracking(add)
    add_json(add)


def run(args) -> int:
    from stageflow import server  # noqa: PLC0415

    if args.server_command == "user":
        from stageflow import access  # noqa: PLC0415

        grants = access.add_user(args.username, args.role, args.model, args.tracking_uri)
        lines = [f"{args.username} is a {args.role} of {args.model}:"] + [
            f"  {g.permission:<6} {g.resource_type.replace('_', ' ')} {g.name}" for g in grants
        ]
        emit(
            args,
            {"user": args.username, "role": args.role, "model": args.model,
             "grants": [asdict(g) for g in grants]},
            "\n".join(lines),
        )  # fmt: skip
        return 0
    if args.server_command == "stop":
        stopped = server.stop()
        if stopped is None:
            print("no server to stop")
        elif stopped.stale:
            print(
                f"removed a stale {server.STATE_FILE}: pid {stopped.pid} is no longer the "
                "tracking server it records, so nothing was signalled"
            )
        else:
            print(f"stopped the tracking server at {stopped.uri}")
        return 0
    info = server.start(
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        host=args.host,
        auth=args.auth,
        allowed_hosts=args.allowed_hosts,
        insecure_no_auth=args.insecure_no_auth,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    verb = "reusing the running" if info.reused else "started the"
    print(f"{verb} tracking server at {info.uri} (UI: {info.uri}, log: {info.log})")
    print(f"  export MLFLOW_TRACKING_URI={info.uri}")
    if info.ca_cert:
        print(
            f"  export MLFLOW_TRACKING_SERVER_CERT_PATH={info.ca_cert}"
            "  # its CA: copy it to clients"
        )
    if info.auth:
        print("  export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
    if args.detach or info.reused:
        return 0
    print("Ctrl-C stops it.")
    server.run_foreground(info)
    return 0
