"""Where an Optuna study lives: SQLite on one machine, PostgreSQL across several.

Several worker processes write to one study at once. SQLite can take that only if
every writer waits its turn instead of failing with "database is locked":

- WAL mode (stored in the file), so readers never block the writer;
- a busy timeout on every connection, so a writer waits for the lock;
- ``BEGIN IMMEDIATE`` for every transaction. Python's sqlite3 otherwise opens a
  deferred transaction that reads first and upgrades to a write lock later; when
  two such transactions race, SQLite answers the second ``SQLITE_BUSY`` at once,
  busy timeout or not (https://www.sqlite.org/lang_transaction.html), which is the
  "database is locked" Optuna users meet with ``n_jobs`` or several processes.

PostgreSQL needs none of this; a URI with ``postgresql://`` is given the psycopg 3
driver (the one Stageflow installs) and a short connect timeout, so an unreachable
server is one clear line, not a hang.
"""

from __future__ import annotations

import logging
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from stageflow import tracking
from stageflow.errors import StageflowError, UsageError
from stageflow.secrets import mask_uri

logger = logging.getLogger(__name__)

SQLITE, POSTGRESQL = "sqlite", "postgresql"
SCHEMES = (SQLITE, POSTGRESQL)
DEFAULT_STORAGE_FILE = "optuna.db"
SQLITE_BUSY_TIMEOUT_S = 120
POSTGRES_CONNECT_TIMEOUT_S = 5
# A worker that dies (a machine lost, a kill -9) leaves its trial RUNNING; the others
# mark it failed once its heartbeat is this stale, so the study does not wait forever.
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120


def default_storage_uri() -> str:
    """``sqlite:///$STAGEFLOW_HOME/optuna.db``."""
    return f"sqlite:///{tracking.home() / DEFAULT_STORAGE_FILE}"


def normalize(uri: str) -> str:
    """Check the scheme and choose the driver Stageflow ships.

    Raises:
        UsageError: not a URI, or neither SQLite nor PostgreSQL.
    """
    try:
        url = make_url(uri)
    except ArgumentError:
        raise UsageError(
            f"--storage {mask(uri)!r} is not a database URI; use sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DATABASE"
        ) from None
    backend = url.get_backend_name()
    if backend not in SCHEMES:
        raise UsageError(
            f"--storage scheme {url.drivername!r} is not supported; use sqlite:///PATH "
            "(one machine) or postgresql://USER@HOST:PORT/DATABASE (several machines)"
        )
    if backend == POSTGRESQL and "+" not in url.drivername:
        # Say which driver: older SQLAlchemy defaults to psycopg2, which is not installed;
        # psycopg 3 is (pyproject.toml).
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def mask(uri: str) -> str:
    """The URI with its password replaced by ``***``: safe to log, print and tag."""
    return mask_uri(uri)


def open_storage(uri: str, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage for ``uri`` (already :func:`normalize` d), safe for many writers.

    Raises:
        StageflowError: the database cannot be reached or opened.
    """
    url = make_url(uri)
    sqlite = url.get_backend_name() == SQLITE
    if sqlite:
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        if url.database and url.database != ":memory:":
            _create_in_wal_mode(Path(url.database))
    else:
        engine_kwargs = {
            "pool_pre_ping": True,
            "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        }
    heartbeat_kwargs = (
        {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": HEARTBEAT_GRACE_S}
        if heartbeat
        else {}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                uri, engine_kwargs=engine_kwargs, **heartbeat_kwargs
            )
    except (SQLAlchemyError, OSError) as exc:
        detail = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        raise StageflowError(
            f"cannot open the study storage {mask(uri)}: {detail}; check that the database "
            "server is running and reachable from here, or drop --storage to use local SQLite"
        ) from None
    if sqlite:
        _serialise_sqlite_writers(storage.engine)
    return storage


def _create_in_wal_mode(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _serialise_sqlite_writers(engine: sqlalchemy.engine.Engine) -> None:
    """Every transaction takes the write lock up front and waits for it (module docstring).

    This is SQLAlchemy's documented recipe for controlling pysqlite's transactions
    (docs: dialects/sqlite, "Serializable isolation / Savepoints / Transactional DDL").
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        dbapi_connection.execute("PRAGMA synchronous = NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections opened while Optuna created its tables predate the listeners.
    engine.dispose()
