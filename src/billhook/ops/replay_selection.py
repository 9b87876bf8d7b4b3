"""Which stored events a replay touches: by provider id, by invoice, or by arrival-time filter.

`Selection` is what the operator asked for; `plan_replay` turns it into event primary keys in
provider order and counts them and the invoices they are about, and `load_events` reads their
stored raw bodies in chunks (the body is the source of truth: no signature or timestamp check
again). Reads run in short transactions so a long replay never holds SQLite's
write lock between chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.errors import InvalidRequest, NotFound
from billhook.store.invoices import charge_invoices, events_about
from billhook.store.schema import events, invoices

CHUNK = 500


@dataclass(frozen=True)
class Selection:
    """Exactly one of: provider event ids, an invoice, or an arrival window (`since` ...)."""

    event_ids: tuple[str, ...] = ()
    invoice_id: str | None = None
    since: float | None = None
    until: float | None = None
    type: str | None = None
    source: str | None = None

    def check(self, *, rebuild: bool = False) -> None:
        chosen = sum((bool(self.event_ids), self.invoice_id is not None, self.since is not None))
        if chosen != 1:
            raise InvalidRequest(
                "choose what to replay with exactly one of --event ID..., --invoice ID or "
                "--since T (optionally with --until, --type, --source)"
            )
        if self.since is None and (self.until is not None or self.type is not None):
            raise InvalidRequest("--until and --type go with --since")
        if self.invoice_id is not None and self.source is not None:
            raise InvalidRequest("--source goes with --since or --event, not --invoice")
        if rebuild and self.invoice_id is None:
            raise InvalidRequest("--rebuild recomputes one invoice: give it with --invoice ID")

    def params(self) -> dict[str, Any]:
        """The selection as audit parameters (only what was given)."""
        values = {
            "event_ids": list(self.event_ids) or None,
            "invoice_id": self.invoice_id,
            "since": self.since,
            "until": self.until,
            "type": self.type,
            "source": self.source,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay would touch, counted before anything runs."""

    event_pks: tuple[int, ...]
    invoice_ids: tuple[str, ...]
    # Events about a charge no invoice event has named yet, or about no invoice at all.
    unresolved: int

    @property
    def events(self) -> int:
        return len(self.event_pks)


@dataclass(frozen=True)
class StoredEvent:
    pk: int
    source: str
    event_id: str
    type: str
    body: bytes
    outcome: str | None


def parse_time(text: str) -> float:
    """Epoch seconds from `1700000000[.5]` or ISO 8601 (no zone = UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(
            f"time {text!r} is neither epoch seconds nor ISO 8601 (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def plan_replay(engine: Engine, selection: Selection) -> ReplayPlan:
    """Count the selected events and the invoices they are about; `NotFound` for unknown ids."""
    selection.check()
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(events.c.id, events.c.event_id, events.c.ordering_key)
            .where(_condition(connection, selection))
            .order_by(sa.func.coalesce(events.c.occurred_at, events.c.received_at), events.c.id)
        ).all()
        _check_found(connection, selection, {row.event_id for row in rows})
        keys = {row.ordering_key for row in rows}
        charges = [key.removeprefix("charge:") for key in keys if key.startswith("charge:")]
        linked = charge_invoices(connection, charges)
    invoice_ids: set[str] = set()
    unresolved = 0
    for row in rows:
        key = row.ordering_key
        if key.startswith("event:"):
            unresolved += 1
        elif key.startswith("charge:"):
            invoice = linked.get(key.removeprefix("charge:"))
            if invoice is None:
                unresolved += 1
            else:
                invoice_ids.add(invoice)
        else:
            invoice_ids.add(key)
    if selection.invoice_id is not None:
        invoice_ids = {selection.invoice_id}
    return ReplayPlan(tuple(row.id for row in rows), tuple(sorted(invoice_ids)), unresolved)


def load_events(connection: Connection, pks: Sequence[int]) -> list[StoredEvent]:
    """The stored events with these primary keys, in the order given."""
    # Driver SQL with one fixed text per dialect (the ids as one JSON text on SQLite, one
    # array on PostgreSQL): no statement to render per chunk size, no result processing.
    rows: Sequence[Any]
    if connection.dialect.name == "postgresql":
        rows = _fetch_binary(connection, _LOAD_EVENTS_POSTGRES, (list(pks),))
    else:
        rows = connection.exec_driver_sql(_LOAD_EVENTS_SQLITE, (orjson.dumps(list(pks)),)).all()
    by_pk = {
        pk: StoredEvent(pk, source, event_id, type_, bytes(body), outcome)
        for pk, source, event_id, type_, body, outcome in rows
    }
    return [by_pk[pk] for pk in pks if pk in by_pk]


def _fetch_binary(connection: Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """Rows in PostgreSQL's binary format: a bytea arrives as it is stored, where the text
    format sends it hex-encoded at twice its size (500 bodies of 4 KB: 45 -> 22 us each).
    SQLAlchemy has no option for binary results, so this goes through the driver's cursor,
    in the connection's transaction; driver errors are wrapped as SQLAlchemy wraps them."""
    dbapi: Any = connection.connection.dbapi_connection
    error: type[Exception] = connection.dialect.loaded_dbapi.Error
    try:
        with dbapi.cursor(binary=True) as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    except error as exc:
        raise sa.exc.DBAPIError.instance(
            sql, params, exc, error, dialect=connection.dialect
        ) from exc


_LOAD_EVENTS = (
    "SELECT e.id, e.source, e.event_id, e.type, e.body, o.outcome FROM events AS e "
    "LEFT JOIN event_outcomes AS o ON o.event_pk = e.id WHERE e.id "
)
_LOAD_EVENTS_SQLITE = _LOAD_EVENTS + "IN (SELECT value FROM json_each(?))"
_LOAD_EVENTS_POSTGRES = _LOAD_EVENTS + "= ANY(%b::int8[])"


def chunks(values: Sequence[int], size: int = CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _condition(connection: Connection, selection: Selection) -> sa.ColumnElement[bool]:
    condition: sa.ColumnElement[bool]
    if selection.event_ids:
        condition = events.c.event_id.in_(list(selection.event_ids))
    elif selection.invoice_id is not None:
        condition = events_about(connection, selection.invoice_id)
    else:
        assert selection.since is not None
        condition = events.c.received_at >= selection.since
        if selection.until is not None:
            condition = sa.and_(condition, events.c.received_at < selection.until)
        if selection.type is not None:
            condition = sa.and_(condition, events.c.type == selection.type)
    if selection.source is not None:
        condition = sa.and_(condition, events.c.source == selection.source)
    return condition


def _check_found(connection: Connection, selection: Selection, found: set[str]) -> None:
    missing = sorted(set(selection.event_ids) - found)
    if missing:
        where = f" from source {selection.source}" if selection.source else ""
        raise NotFound(
            f"no stored event{where} with id {', '.join(missing)}; `billhook` keeps the "
            "provider's ids (evt_..., msg_...), see GET /api/v1/events"
        )
    if selection.invoice_id is not None and not found:
        known = connection.execute(
            sa.select(invoices.c.id).where(invoices.c.id == selection.invoice_id)
        ).first()
        if known is None:
            raise NotFound(
                f"no invoice {selection.invoice_id!r} and no stored event about it; check the id"
            )
