"""``stageflow server start|stop``: the local MLflow tracking server."""

from __future__ import annotations

from stageflow.cli._common import formatter, port


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
            "healthy running server."
        ),
    )
    start.add_argument("--port", type=port, default=5000, help="port (default 5000)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    start.add_argument("--backend-store-uri", metavar="URI", help="e.g. postgresql://user@host/db")
    start.add_argument("--artifacts-destination", metavar="URI", help="where artifacts go")
    start.add_argument(
        "--detach",
        action="store_true",
        help="return once it is healthy; stop it with `server stop`",
    )
    server_commands.add_parser("stop", help="stop the tracking server started from this folder")


def run(args) -> int:
    from stageflow import server  # noqa: PLC0415

    if args.server_command == "stop":
        stopped = server.stop()
        print(f"stopped the tracking server at {stopped.uri}" if stopped else "no server to stop")
        return 0
    info = server.start(
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        host=args.host,
    )
    verb = "reusing the running" if info.reused else "started the"
    print(f"{verb} tracking server at {info.uri} (UI: {info.uri}, log: {info.log})")
    print(f"  export MLFLOW_TRACKING_URI={info.uri}")
    if args.detach or info.reused:
        return 0
    print("Ctrl-C stops it.")
    server.run_foreground(info)
    return 0
