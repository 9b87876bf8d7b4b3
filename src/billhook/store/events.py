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
    event = arrival.event
    insert = _insert_events(connection).values(
        source=event.source,
        event_id=event.event_id,
        type=event.type,
        ordering_key=event.ordering_key,
        occurred_at=event.occurred_at,
        received_at=arrival.received_at,
        last_seen_at=arrival.received_at,
        delivery_count=1,
        headers=orjson.dumps(event.headers).decode(),
        body=event.body,
    )
    insert = insert.on_conflict_do_nothing(index_elements=["source", "event_id"])
    event_pk = connection.execute(insert.returning(events.c.id)).scalar()
    if event_pk is not None:
        connection.execute(
            jobs.insert().values(
                kind="process_event",
                event_pk=event_pk,
                ordering_key=event.ordering_key,
                order_ts=(
                    event.occurred_at if event.occurred_at is not None else arrival.received_at
                ),
                state="available",
                attempts=0,
                max_attempts=max_attempts,
                run_at=now,
                created_at=now,
            )
        )
        status: Status = "accepted"
    else:
        event_pk = _count_duplicate(connection, arrival)
        status = "duplicate"
    connection.execute(
        deliveries.insert().values(
            event_pk=event_pk, received_at=arrival.received_at, outcome=status
        )
    )
    return Recorded(status=status, event_pk=int(event_pk))


def record_many(
    engine: Engine, arrivals: Sequence[Arrival], *, now: float, max_attempts: int
) -> list[Recorded]:
    """Store several deliveries in one transaction (one commit): all or none."""
    with transaction(engine) as connection:
        return [record(connection, a, now=now, max_attempts=max_attempts) for a in arrivals]


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
