"""Read stored events for operators: a filtered page, or one event with raw body and deliveries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import InvalidRequest, NotFound
from billhook.ops.pages import DEFAULT_LIMIT, Page, check_limit, decode_cursor, encode_cursor
from billhook.store.schema import deliveries, event_outcomes, events, events_with_outcomes

# `outcome` is NULL while an event waits for processing; the API calls that `pending`.
PENDING = "pending"
EVENT_OUTCOMES = (PENDING, "processed", "ignored", "failed")


@dataclass(frozen=True)
class EventSummary:
    id: int
    source: str
    event_id: str
    type: str
    ordering_key: str
    occurred_at: float | None
    received_at: float
    last_seen_at: float
    delivery_count: int
    outcome: str
    processed_at: float | None


@dataclass(frozen=True)
class DeliveryView:
    id: int
    received_at: float
    outcome: str


@dataclass(frozen=True)
class EventDetail:
    event: EventSummary
    headers: dict[str, str]
    # The raw body exactly as received, decoded as UTF-8 (undecodable bytes replaced, and
    # `body_is_utf8` false then): it is what the signature was computed over and what replay reads.
    body: str
    body_is_utf8: bool
    deliveries: list[DeliveryView]


_SUMMARY = (
    events.c.id,
    events.c.source,
    events.c.event_id,
    events.c.type,
    events.c.ordering_key,
    events.c.occurred_at,
    events.c.received_at,
    # Derived from the deliveries (indexed by event_pk): ingest never rewrites an event row.
    sa.select(sa.func.max(deliveries.c.received_at))
    .where(deliveries.c.event_pk == events.c.id)
    .scalar_subquery()
    .label("last_seen_at"),
    sa.select(sa.func.count())
    .where(deliveries.c.event_pk == events.c.id)
    .scalar_subquery()
    .label("delivery_count"),
    event_outcomes.c.outcome,
    event_outcomes.c.processed_at,
)


def list_events(
    engine: Engine,
    *,
    source: str | None = None,
    type: str | None = None,
    ordering_key: str | None = None,
    outcome: str | None = None,
    received_since: float | None = None,
    received_until: float | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page[EventSummary]:
    """Events matching every filter given, newest arrival first.

    `ordering_key` is usually the invoice id; `received_since` is inclusive, `received_until`
    exclusive.
    """
    check_limit(limit)
    query = sa.select(*_SUMMARY).select_from(events_with_outcomes).order_by(events.c.id.desc())
    if source is not None:
        query = query.where(events.c.source == source)
    if type is not None:
        query = query.where(events.c.type == type)
    if ordering_key is not None:
        query = query.where(events.c.ordering_key == ordering_key)
    if outcome is not None:
        if outcome not in EVENT_OUTCOMES:
            raise InvalidRequest(
                f"outcome must be one of {', '.join(EVENT_OUTCOMES)}, got {outcome!r}"
            )
        query = query.where(
            event_outcomes.c.outcome.is_(None)
            if outcome == PENDING
            else event_outcomes.c.outcome == outcome
        )
    if received_since is not None:
        query = query.where(events.c.received_at >= received_since)
    if received_until is not None:
        query = query.where(events.c.received_at < received_until)
    if cursor is not None:
        (after_id,) = decode_cursor(cursor, (int,))
        query = query.where(events.c.id < after_id)
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit + 1)).mappings().all()
    items = [_summary(row) for row in rows[:limit]]
    next_cursor = encode_cursor([items[-1].id]) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


def get_event(engine: Engine, event_id: str, *, source: str | None = None) -> EventDetail:
    """One event by its provider id (`evt_...`, `msg_...`), or by billhook's numeric id.

    A provider id shared by two sources needs `source` to say which one.
    """
    with engine.connect() as connection:
        query = (
            sa.select(*_SUMMARY, events.c.headers, events.c.body)
            .select_from(events_with_outcomes)
            .where(events.c.event_id == event_id)
        )
        if source is not None:
            query = query.where(events.c.source == source)
        rows = connection.execute(query.limit(2)).mappings().all()
        if not rows and event_id.isdigit() and len(event_id) < 19:
            rows = (
                connection.execute(
                    sa.select(*_SUMMARY, events.c.headers, events.c.body)
                    .select_from(events_with_outcomes)
                    .where(events.c.id == int(event_id))
                )
                .mappings()
                .all()
            )
        if len(rows) > 1:
            raise InvalidRequest(
                f"event id {event_id!r} exists for several sources; add source=stripe or "
                "source=standard"
            )
        if not rows:
            raise NotFound(f"no stored event {event_id!r}; list events with GET /api/v1/events")
        row = rows[0]
        delivery_rows = (
            connection.execute(
                sa.select(deliveries.c.id, deliveries.c.received_at, deliveries.c.outcome)
                .where(deliveries.c.event_pk == row["id"])
                .order_by(deliveries.c.id)
            )
            .mappings()
            .all()
        )
    raw = bytes(row["body"])
    try:
        body, is_utf8 = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        body, is_utf8 = raw.decode("utf-8", errors="replace"), False
    return EventDetail(
        event=_summary(row),
        headers=_headers(row["headers"]),
        body=body,
        body_is_utf8=is_utf8,
        deliveries=[
            DeliveryView(id=int(d["id"]), received_at=float(d["received_at"]), outcome=d["outcome"])
            for d in delivery_rows
        ],
    )


def _headers(stored: str) -> dict[str, str]:
    # Ingest stores a JSON object; anything else is shown rather than hidden.
    try:
        decoded: Any = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return {"_unparsed": stored}
    if isinstance(decoded, dict):
        return {str(k): str(v) for k, v in decoded.items()}
    return {"_unparsed": stored}


def _summary(row: sa.RowMapping) -> EventSummary:
    return EventSummary(
        id=int(row["id"]),
        source=row["source"],
        event_id=row["event_id"],
        type=row["type"],
        ordering_key=row["ordering_key"],
        occurred_at=None if row["occurred_at"] is None else float(row["occurred_at"]),
        received_at=float(row["received_at"]),
        # An event stored without a delivery row (written by hand) was last seen at arrival.
        last_seen_at=float(row["last_seen_at"] or row["received_at"]),
        delivery_count=int(row["delivery_count"]),
        outcome=row["outcome"] or PENDING,
        processed_at=None if row["processed_at"] is None else float(row["processed_at"]),
    )
