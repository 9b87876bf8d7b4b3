"""The ingest write: an event, its delivery and its processing job in one transaction.

A second delivery of the same (source, event id) records a `duplicate` delivery row and
enqueues nothing; the event row is never rewritten (its delivery count and last-seen time are
read from `deliveries`). `INSERT ... ON CONFLICT DO NOTHING RETURNING` makes this hold between
concurrent writers on both databases: the loser of a race waits for the winner's commit,
inserts nothing and takes the duplicate path.

The batch goes through the raw DBAPI cursor in a fixed number of statements whatever its size
and mix (events insert, one `SELECT` of the ids of every already-stored event, jobs insert,
deliveries insert): SQLAlchemy's per-row parameter processing cost more than the commit. On
PostgreSQL the events insert also returns the ids of the events already stored, so a batch of
duplicates waits for the server as many times as a batch of new events. A duplicate therefore
costs no more than a new event: a read by the unique index and a small delivery row, where a
new event writes its large row, its indexes and its job.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy.engine import Connection, Engine

from billhook.errors import StoreUnavailable
from billhook.sources import IncomingEvent
from billhook.store.batch_writes import insert, write_many
from billhook.store.engine import transaction

Status = Literal["accepted", "duplicate"]
_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Recorded:
    status: Status
    event_pk: int

    @property
    def enqueued(self) -> bool:
        return self.status == "accepted"


@dataclass(frozen=True, slots=True)
class Arrival:
    """An incoming event and the time its delivery arrived."""

    event: IncomingEvent
    received_at: float


Outcome = Literal["processed", "ignored", "failed"]

# An outcome is a row of its own, so the event row is never rewritten (see the schema).
_MARK_OUTCOMES = insert(
    "event_outcomes",
    {"event_pk": "int8", "outcome": "text", "processed_at": "float8"},
    suffix=" ON CONFLICT (event_pk) DO UPDATE "
    "SET outcome = excluded.outcome, processed_at = excluded.processed_at",
)


def mark_outcomes(
    connection: Connection, event_pks: Sequence[int], outcome: Outcome, *, now: float
) -> None:
    """Record what processing made of these events (each at most once per call), in the
    caller's transaction; a later mark replaces an earlier one."""
    write_many(connection, _MARK_OUTCOMES, [(pk, outcome, now) for pk in event_pks])


def record(
    connection: Connection, arrival: Arrival, *, now: float, max_attempts: int
) -> Recorded:
    """Store one delivery inside the caller's transaction."""
    return record_batch(connection, [arrival], now=now, max_attempts=max_attempts)[0]


def record_many(
    engine: Engine, arrivals: Sequence[Arrival], *, now: float, max_attempts: int
) -> list[Recorded]:
    """Store several deliveries in one transaction (one commit): all or none."""
    with transaction(engine) as connection:
        return record_batch(connection, arrivals, now=now, max_attempts=max_attempts)


def record_batch(
    connection: Connection, arrivals: Sequence[Arrival], *, now: float, max_attempts: int
) -> list[Recorded]:
    """Store deliveries inside the caller's transaction, four statements for the whole batch.

    The first delivery of an event not yet stored is `accepted` (event row + job); every other
    one, earlier in the database or earlier in this batch, is a `duplicate`.
    """
    if not arrivals:
        return []
    # Per distinct event: its first arrival in the batch.
    first: dict[_Key, int] = {}
    for index, arrival in enumerate(arrivals):
        first.setdefault((arrival.event.source, arrival.event.event_id), index)
    postgres = connection.dialect.name == "postgresql"
    sql = _POSTGRES if postgres else _SQLITE
    dbapi: Any = connection.connection.dbapi_connection
    cursor = dbapi.cursor()
    # PostgreSQL: the statements go out in one pipeline (psycopg 3), so the batch waits for the
    # server twice (the events insert whose ids the rest needs, then the rest) rather than once
    # per statement, BEGIN included.
    try:
        with dbapi.pipeline() if postgres else contextlib.nullcontext():
            return _write(sql, cursor, arrivals, first, max_attempts=max_attempts, now=now)
    finally:
        cursor.close()


def _write(
    sql: _Sqlite | _Postgres,
    cursor: Any,
    arrivals: Sequence[Arrival],
    first: dict[_Key, int],
    *,
    max_attempts: int,
    now: float,
) -> list[Recorded]:
    """The statements of `record_batch`: events, already-stored ids, jobs, deliveries."""
    # One lock order for every writer (several server processes on PostgreSQL).
    keys = sorted(first)
    inserted, stored = sql.insert_events(cursor, [arrivals[first[k]] for k in keys])
    missing = [k for k in keys if k not in inserted and k not in stored]
    if missing:
        # PostgreSQL: stored by a concurrent writer that committed after our statement began
        # (its insert made ours wait); a new statement sees it.
        stored.update(sql.find_events(cursor, missing))
        if any(k not in stored for k in missing):
            # Only possible if the conflicting row vanished between the two statements.
            raise StoreUnavailable(
                "the event changed while it was being stored: retry the delivery"
            )
    results: list[Recorded] = []
    new_jobs: list[tuple[Any, ...]] = []
    for index, arrival in enumerate(arrivals):
        event = arrival.event
        key = (event.source, event.event_id)
        event_pk = inserted.get(key)
        if event_pk is not None and first[key] == index:
            results.append(Recorded("accepted", event_pk))
            occurred_at = event.occurred_at
            new_jobs.append(
                (
                    event_pk,
                    event.ordering_key,
                    occurred_at if occurred_at is not None else arrival.received_at,
                    max_attempts,
                    now,
                )
            )
        else:
            results.append(Recorded("duplicate", event_pk or stored[key]))
    if new_jobs:
        sql.insert_jobs(cursor, new_jobs)
    sql.insert_deliveries(
        cursor,
        [(r.event_pk, a.received_at, r.status) for a, r in zip(arrivals, results, strict=True)],
    )
    return results


_EVENT_COLUMNS = "source, event_id, type, ordering_key, occurred_at, received_at, headers, body"
_JOB_COLUMNS = (
    "kind, event_pk, ordering_key, order_ts, state, attempts, max_attempts, run_at, created_at"
)
_JOB_CONSTANTS = "'process_event'", "'available'", "0"


def _event_row(arrival: Arrival) -> tuple[Any, ...]:
    event = arrival.event
    return (
        event.source,
        event.event_id,
        event.type,
        event.ordering_key,
        event.occurred_at,
        arrival.received_at,
        orjson.dumps(event.headers).decode(),
        event.body,
    )


class _Sqlite:
    """Multi-row VALUES, one statement per step and batch size (cached)."""

    @classmethod
    def insert_events(
        cls, cursor: Any, rows: Sequence[Arrival]
    ) -> tuple[dict[_Key, int], dict[_Key, int]]:
        """(inserted, already stored) ids by key. One writer at a time: nothing can come
        between the insert and the read of the events it did not insert."""
        params = [value for row in rows for value in _event_row(row)]
        cursor.execute(_sqlite_insert_events(len(rows)), params)
        inserted = {(source, event_id): int(pk) for pk, source, event_id in cursor.fetchall()}
        existing = [
            (row.event.source, row.event.event_id)
            for row in rows
            if (row.event.source, row.event.event_id) not in inserted
        ]
        return inserted, cls.find_events(cursor, existing) if existing else {}

    @staticmethod
    def find_events(cursor: Any, keys: Sequence[_Key]) -> dict[_Key, int]:
        cursor.execute(_sqlite_find_events(len(keys)), [v for key in keys for v in key])
        return {(source, event_id): int(pk) for pk, source, event_id in cursor.fetchall()}

    @staticmethod
    def insert_jobs(cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        cursor.execute(_sqlite_insert_jobs(len(rows)), [v for row in rows for v in (*row, row[-1])])

    @staticmethod
    def insert_deliveries(cursor: Any, rows: Sequence[tuple[int, float, str]]) -> None:
        cursor.execute(_sqlite_insert_deliveries(len(rows)), [v for row in rows for v in row])


# Multi-row VALUES rather than `executemany`: the sqlite3 module releases the GIL around every
# row's step and must take it back from the busy event loop thread each time (up to the switch
# interval per row); one statement per batch takes it back once.
@functools.lru_cache(maxsize=64)
def _sqlite_insert_jobs(n: int) -> str:
    row = f"({_JOB_CONSTANTS[0]}, ?, ?, ?, {_JOB_CONSTANTS[1]}, {_JOB_CONSTANTS[2]}, ?, ?, ?)"
    return f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES {', '.join([row] * n)}"


@functools.lru_cache(maxsize=64)
def _sqlite_insert_deliveries(n: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * n)
    return f"INSERT INTO deliveries (event_pk, received_at, outcome) VALUES {values}"


@functools.lru_cache(maxsize=64)
def _sqlite_insert_events(n: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    return (
        f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES {values} "
        "ON CONFLICT (source, event_id) DO NOTHING RETURNING id, source, event_id"
    )


@functools.lru_cache(maxsize=64)
def _sqlite_find_events(n: int) -> str:
    values = ", ".join(["(?, ?)"] * n)
    return (
        f"WITH v(source, event_id) AS (VALUES {values}) "
        "SELECT e.id, e.source, e.event_id FROM v "
        "JOIN events AS e ON e.source = v.source AND e.event_id = v.event_id"
    )


class _Postgres:
    """Columns as arrays through `unnest`: one fixed statement text per step, prepared once.

    Parameters go in binary (`%b`): psycopg dumps a text-format array element by element in
    Python, escaping every byte of every body, which cost three times the rest of the write.
    """

    # Each delivered key looked up on its own through the (source, event_id) index, whatever the
    # statistics say: as a plain join, a table not yet analyzed (a new deployment, any table
    # that grew fast since its last ANALYZE) was planned as a hash join over a sequential scan
    # of every stored event, per batch (pipeline benchmark: 1,725 scans reading 12 million rows
    # for 10,000 events). LIMIT 1 keeps the planner from turning the lookup back into a join.
    _STORED_EVENT = (
        "CROSS JOIN LATERAL (SELECT x.id, x.source, x.event_id FROM events AS x "
        "WHERE x.source = v.source AND x.event_id = v.event_id LIMIT 1) AS e"
    )

    # The insert, and the ids of the events already stored, in one round trip: the outer SELECT
    # reads the statement's snapshot, which holds every event committed before it began and not
    # the rows its own INSERT adds. An event committed by a concurrent writer after the snapshot
    # (the INSERT waited for it) is in neither half: `_write` looks it up afresh.
    _INSERT_EVENTS = (
        f"WITH v ({_EVENT_COLUMNS}) AS ("
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], "
        "%b::float8[], %b::text[], %b::bytea[])), "
        f"ins AS (INSERT INTO events ({_EVENT_COLUMNS}) SELECT * FROM v "
        "ON CONFLICT (source, event_id) DO NOTHING RETURNING id, source, event_id) "
        "SELECT id, source, event_id, true FROM ins "
        "UNION ALL "
        f"SELECT e.id, e.source, e.event_id, false FROM v {_STORED_EVENT}"
    )
    _FIND_EVENTS = (
        "SELECT e.id, e.source, e.event_id "
        f"FROM unnest(%b::text[], %b::text[]) AS v(source, event_id) {_STORED_EVENT}"
    )
    _INSERT_JOBS = (
        f"INSERT INTO jobs ({_JOB_COLUMNS}) "
        f"SELECT {_JOB_CONSTANTS[0]}, j.event_pk, j.ordering_key, j.order_ts, "
        f"{_JOB_CONSTANTS[1]}, {_JOB_CONSTANTS[2]}, j.max_attempts, j.now, j.now "
        "FROM unnest(%b::int8[], %b::text[], %b::float8[], %b::int[], %b::float8[]) "
        "AS j(event_pk, ordering_key, order_ts, max_attempts, now)"
    )
    _INSERT_DELIVERIES = (
        "INSERT INTO deliveries (event_pk, received_at, outcome) "
        "SELECT * FROM unnest(%b::int8[], %b::float8[], %b::text[])"
    )

    @classmethod
    def insert_events(
        cls, cursor: Any, rows: Sequence[Arrival]
    ) -> tuple[dict[_Key, int], dict[_Key, int]]:
        """(inserted, already stored) ids by key."""
        cursor.execute(cls._INSERT_EVENTS, _columns([_event_row(row) for row in rows], 8))
        inserted: dict[_Key, int] = {}
        stored: dict[_Key, int] = {}
        for pk, source, event_id, is_new in cursor.fetchall():
            (inserted if is_new else stored)[(source, event_id)] = int(pk)
        return inserted, stored

    @classmethod
    def find_events(cls, cursor: Any, keys: Sequence[_Key]) -> dict[_Key, int]:
        # READ COMMITTED: a new statement sees the row of a concurrent writer whose insert
        # this transaction's `ON CONFLICT DO NOTHING` waited for.
        cursor.execute(cls._FIND_EVENTS, _columns(keys, 2))
        return {(source, event_id): int(pk) for pk, source, event_id in cursor.fetchall()}

    @classmethod
    def insert_jobs(cls, cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        cursor.execute(cls._INSERT_JOBS, _columns(rows, 5))

    @classmethod
    def insert_deliveries(cls, cursor: Any, rows: Sequence[tuple[int, float, str]]) -> None:
        cursor.execute(cls._INSERT_DELIVERIES, _columns(rows, 3))


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


_SQLITE = _Sqlite()
_POSTGRES = _Postgres()
