"""Engine factory: SQLite (WAL, FULL sync, writers take turns) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from billhook.errors import StoreUnavailable
from billhook.store.wal_checkpoints import WRITER_AUTOCHECKPOINT_PAGES, checkpointer_for
from billhook.store.write_turns import TurnTakingConnection, is_database_file

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """Accept the URLs people write (`postgresql://`, `postgres://`) and pick psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def create_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                "check_same_thread": False,
                "factory": TurnTakingConnection,
            },
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    return sa.create_engine(url, connect_args={"connect_timeout": 5}, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    database = engine.url.database
    checkpointer = checkpointer_for(database) if database and is_database_file(database) else None

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's deferred BEGIN,
        # so a transaction that will write takes the write lock up front (no upgrade deadlocks).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Statement journals and sorts in memory: as files, SQLite created, wrote and unlinked
        # one per multi-row statement (~8 KB of writes per stored event in `billhook serve`).
        cursor.execute("PRAGMA temp_store=MEMORY")
        if checkpointer is not None and isinstance(dbapi_connection, TurnTakingConnection):
            # Commits leave checkpoints to this process's checkpointer thread.
            cursor.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
            dbapi_connection.after_write = checkpointer.committed
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_READING):
            return  # `reading`: each statement reads the last commit, no write turn taken
        dbapi_connection = connection.connection.dbapi_connection
        if isinstance(dbapi_connection, TurnTakingConnection):
            dbapi_connection.begin_immediate()  # waits for this database's write turn
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


_READING = "billhook_reading"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads outside any write transaction.

    On SQLite it takes no write turn and begins no transaction: each statement reads the last
    committed state, while writers go on. Rows that never change once written (stored events)
    read the same as inside the writer's transaction, without holding the one write lock
    meanwhile; rows that change (invoices) must be checked when written (their version). Nothing
    may be written through it. On PostgreSQL it is a plain transaction, rolled back at the end.
    Driver connection errors become `StoreUnavailable`."""
    try:
        with engine.connect().execution_options(**{_READING: True}) as connection:
            yield connection
    except DRIVER_ERRORS as exc:
        raise unavailable(exc) from exc


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction; driver connection errors become `StoreUnavailable`."""
    try:
        with engine.begin() as connection:
            yield connection
    except DRIVER_ERRORS as exc:
        raise unavailable(exc) from exc


# The driver errors that mean the database, not the statement, failed: retry later.
DRIVER_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError)


def unavailable(exc: sa.exc.OperationalError | sa.exc.InterfaceError) -> StoreUnavailable:
    """The `StoreUnavailable` a caller raises for one of `DRIVER_ERRORS`."""
    if isinstance(exc, sa.exc.InterfaceError):
        return StoreUnavailable(f"the database connection failed: {_short(exc)}")
    return StoreUnavailable(f"the database cannot commit right now: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def among_per_dialect(
    column: sa.ColumnElement[Any], item_type: sa.types.TypeEngine[Any]
) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """`column` among the list bound as `ids`, as (SQLite, PostgreSQL) clauses: index a pair with
    `dialect is postgresql`. PostgreSQL gets one array parameter, so every batch size runs the
    same prepared statement instead of parsing and planning a new IN list each time."""
    return (
        column.in_(sa.bindparam("ids", expanding=True)),
        column == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(item_type))),
    )
