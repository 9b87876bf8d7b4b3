"""The ingest write: an event, its delivery and its processing job in one transaction.

A second delivery of the same (source, event id) records a `duplicate` delivery, bumps the
event's delivery count and last-seen time, and enqueues nothing. `INSERT ... ON CONFLICT DO
NOTHING RETURNING` makes this hold between concurrent writers on both databases: the loser of
a race waits for the winner's commit, inserts nothing and takes the duplicate path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from billhook.errors import StoreUnavailable
from billhook.sources import IncomingEvent
from billhook.store.engine import transaction
from billhook.store.schema import deliveries, events, jobs

Status = Literal["accepted", "duplicate"]


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
    """Store deliveries inside the caller's transaction, a few statements for the whole batch.

    The first delivery of an event not yet stored is `accepted` (event row + job); every other
    one, earlier in the database or earlier in this batch, is a `duplicate`.
    """
    first: dict[tuple[str, str], int] = {}
    for index, arrival in enumerate(arrivals):
        first.setdefault((arrival.event.source, arrival.event.event_id), index)
    inserted = _insert_new(connection, [arrivals[i] for i in first.values()])
    results: list[Recorded] = []
    new_jobs: list[dict[str, object]] = []
    for index, arrival in enumerate(arrivals):
        key = (arrival.event.source, arrival.event.event_id)
        if key in inserted and first[key] == index:
            event_pk = inserted[key]
            results.append(Recorded("accepted", event_pk))
            new_jobs.append(_job_values(arrival, event_pk, now, max_attempts))
        else:
            results.append(Recorded("duplicate", _count_duplicate(connection, arrival)))
    if new_jobs:
        connection.execute(jobs.insert(), new_jobs)
    connection.execute(
        deliveries.insert(),
        [
            {"event_pk": r.event_pk, "received_at": a.received_at, "outcome": r.status}
            for a, r in zip(arrivals, results, strict=True)
        ],
    )
    return results


def _insert_new(connection: Connection, arrivals: Sequence[Arrival]) -> dict[tuple[str, str], int]:
    """Insert the events not stored yet; return the primary keys of those this call inserted."""
    if not arrivals:
        return {}
    insert = _insert_events(connection).on_conflict_do_nothing(
        index_elements=["source", "event_id"]
    )
    rows = connection.execute(
        insert.returning(events.c.id, events.c.source, events.c.event_id),
        [
            {
                "source": a.event.source,
                "event_id": a.event.event_id,
                "type": a.event.type,
                "ordering_key": a.event.ordering_key,
                "occurred_at": a.event.occurred_at,
                "received_at": a.received_at,
                "last_seen_at": a.received_at,
                "delivery_count": 1,
                "headers": orjson.dumps(a.event.headers).decode(),
                "body": a.event.body,
            }
            for a in arrivals
        ],
    ).all()
    return {(row.source, row.event_id): int(row.id) for row in rows}


def _job_values(
    arrival: Arrival, event_pk: int, now: float, max_attempts: int
) -> dict[str, object]:
    occurred_at = arrival.event.occurred_at
    return {
        "kind": "process_event",
        "event_pk": event_pk,
        "ordering_key": arrival.event.ordering_key,
        "order_ts": occurred_at if occurred_at is not None else arrival.received_at,
        "state": "available",
        "attempts": 0,
        "max_attempts": max_attempts,
        "run_at": now,
        "created_at": now,
    }


def _count_duplicate(connection: Connection, arrival: Arrival) -> int:
    seen: sa.BindParameter[float] = sa.bindparam("seen", arrival.received_at, type_=sa.Double())
    update = (
        events.update()
        .where(events.c.source == arrival.event.source)
        .where(events.c.event_id == arrival.event.event_id)
        .values(
            delivery_count=events.c.delivery_count + 1,
            last_seen_at=sa.case((events.c.last_seen_at < seen, seen), else_=events.c.last_seen_at),
        )
        .returning(events.c.id)
    )
    event_pk = connection.execute(update).scalar()
    if event_pk is None:
        # Only possible if the conflicting row vanished between the two statements.
        raise StoreUnavailable("the event changed while it was being stored: retry the delivery")
    return int(event_pk)


def _insert_events(connection: Connection) -> sqlite.Insert | postgresql.Insert:
    if connection.dialect.name == "sqlite":
        return sqlite.insert(events)
    return postgresql.insert(events)
