"""Per-connection SQLite tuning inside Stageflow's embedded ``mlflow server``.

``stageflow.server`` puts this folder first on the ``PYTHONPATH`` of the server it
starts, so Python imports this module at start-up in every process of that server,
including the uvicorn child that ``mlflow server`` launches and that does the
tracking writes. It acts only when ``STAGEFLOW_SQLITE_SYNCHRONOUS`` is set, and
then sets ``PRAGMA synchronous`` on each new SQLite connection SQLAlchemy opens.
The pragma is per connection (unlike ``journal_mode=WAL``, which the database
file keeps), so setting it once from outside the server would not last.

Why NORMAL: in WAL mode with SQLite's default ``synchronous=FULL`` every commit
(one per ``log_metric``) fsyncs the WAL; with NORMAL the WAL is fsynced only at
checkpoints. The database cannot be corrupted either way, and a process crash
loses nothing; what a power cut or OS crash may lose is the last transactions
before it. That is the standard trade for WAL (https://sqlite.org/pragma.html#pragma_synchronous).

This file shadows any other ``sitecustomize`` on the path, so it runs that one too.
"""

import os
import sys

SYNCHRONOUS_ENV = "STAGEFLOW_SQLITE_SYNCHRONOUS"
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _tune_sqlite_connections(level: str) -> None:
    if level not in SYNCHRONOUS_LEVELS:
        sys.stderr.write(
            f"stageflow: ignoring {SYNCHRONOUS_ENV}={level!r}; use one of {SYNCHRONOUS_LEVELS}\n"
        )
        return
    try:
        import sqlite3

        from sqlalchemy import event
        from sqlalchemy.engine import Engine
    except ImportError:  # not an MLflow process after all: nothing to tune
        return

    def set_synchronous(dbapi_connection, connection_record):
        if isinstance(dbapi_connection, sqlite3.Connection):  # never PostgreSQL or MySQL
            dbapi_connection.execute(f"PRAGMA synchronous={level}")

    event.listen(Engine, "connect", set_synchronous)


def _run_shadowed_sitecustomize() -> None:
    """Run the ``sitecustomize`` this one hides (a distribution's or a virtualenv's), if any."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if level := os.environ.get(SYNCHRONOUS_ENV, "").strip().upper():
    _tune_sqlite_connections(level)
_run_shadowed_sitecustomize()
