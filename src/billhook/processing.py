"""Processing one stored event: parse it, apply the billing model, commit state + story + effects.

This is the imperative shell around the pure model (`billhook.billing`). For one event it runs,
in ONE transaction: resolve the invoice (refunds and disputes name only their charge), apply the
event, write the invoice under a version check, append the transitions that say why, insert the
effect intents into the outbox (unique idempotency keys), and mark the event processed.

It is safe to run any number of times for the same event: the model is idempotent (applying an
event twice changes nothing the second time) and the outbox refuses a key it already holds. That
is what makes worker crashes, provider duplicates and operator replays harmless.

`handle_process_event(engine, job)` and `on_job_dead(connection, job)` are the names the queue's
default registry runs; `Processor(settings)` is the same handler with explicit settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.billing import BillingEvent, UnprocessableEvent, apply, needs_attention, parse_event
from billhook.config import Settings, load_settings
from billhook.effects.outbox import enqueue_effects
from billhook.errors import BillhookError, NotFound
from billhook.queue.jobs import Job
from billhook.store.engine import transaction
from billhook.store.invoices import (
    invoice_for_charge,
    link_charge,
    load_invoice,
    record_changes,
    save_invoice,
)
from billhook.store.schema import events, invoices

DEAD_JOB_MARK = "dead job"

# Built once with bind parameters (building a statement per event cost more than running it).
_EVENT_PK = events.c.id == sa.bindparam("event_pk", type_=sa.BigInteger())
_LOAD_EVENT = sa.select(events.c.source, events.c.body).where(_EVENT_PK)
_MARK = (
    events.update()
    .where(_EVENT_PK)
    .values(outcome=sa.bindparam("outcome"), processed_at=sa.bindparam("processed_at"))
)


class InvoiceNotYetKnown(BillhookError):
    """A refund or dispute names a charge whose invoice billhook has not seen yet.

    The job retries with backoff; the invoice's own events usually arrive in the meantime.
    """


class Processor:
    """The `process_event` handler, bound to its settings."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock

    def __call__(self, engine: Engine, job: Job) -> None:
        if job.event_pk is None:
            return
        # The event is read inside the processing transaction: one connection and one
        # BEGIN per event instead of two.
        with transaction(engine) as connection:
            self.run_in(connection, job)

    def run_in(self, connection: Connection, job: Job) -> None:
        """Process `job`'s event inside the caller's transaction (the worker runs a claimed
        batch in one transaction, each job under its own savepoint)."""
        if job.event_pk is None:
            return
        source, body = _load_event(connection, job.event_pk)
        event = decode_event(source, body)
        if event is None:
            _mark(connection, job.event_pk, "ignored", self.clock())
            return
        self.apply_event(connection, event, source=source, event_pk=job.event_pk)
        _mark(connection, job.event_pk, "processed", self.clock())

    def apply_event(
        self, connection: Connection, event: BillingEvent, *, source: str, event_pk: int | None
    ) -> None:
        """Apply one parsed event inside the caller's transaction (also used by replay)."""
        now = self.clock()
        event = _resolve_invoice(connection, event)
        link = event.charge_link
        if link is not None:
            link_charge(connection, link[0], link[1], now)
        assert event.invoice_id is not None
        seen = load_invoice(connection, event.invoice_id, lock=True)
        applied = apply(None if seen is None else seen.state, event)
        if seen is not None and applied.state == seen.state and not applied.changes:
            return
        attention = merge_attention(
            needs_attention(
                applied.state,
                now=now,
                held_refund_alert_seconds=self.settings.held_refund_alert_seconds,
            ),
            None if seen is None else seen.attention,
        )
        save_invoice(
            connection, applied.state, source=source, seen=seen, attention=attention, now=now
        )
        record_changes(connection, event.invoice_id, applied.changes, event_pk=event_pk, now=now)
        enqueue_effects(
            connection,
            applied.effects,
            invoice_id=event.invoice_id,
            event_pk=event_pk,
            now=now,
            settings=self.settings,
        )


def _load_event(connection: Connection, event_pk: int) -> tuple[str, bytes]:
    row = connection.execute(_LOAD_EVENT, {"event_pk": event_pk}).first()
    if row is None:
        raise NotFound(f"event {event_pk} is not in the store")
    return row.source, bytes(row.body)


def decode_event(source: str, body: bytes) -> BillingEvent | None:
    """The canonical event of a stored raw body; None for types billing ignores."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UnprocessableEvent(f"stored body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UnprocessableEvent("stored body is not a JSON object")
    return parse_event(source, payload)


def _resolve_invoice(connection: Connection, event: BillingEvent) -> BillingEvent:
    if event.invoice_id is not None:
        return event
    if event.charge_id is None:
        raise UnprocessableEvent(
            f"event {event.event_id} ({event.raw_type}) names neither an invoice nor a charge"
        )
    invoice_id = invoice_for_charge(connection, event.charge_id)
    if invoice_id is None:
        raise InvoiceNotYetKnown(
            f"{event.raw_type} {event.event_id} is about charge {event.charge_id}, whose invoice "
            "has not been seen yet; retrying until an invoice event names that charge"
        )
    return event.with_invoice(invoice_id)


def merge_attention(model_reason: str | None, previous: str | None) -> str | None:
    """The model's reasons, plus any dead-job flag an operator has not cleared yet."""
    kept = [part for part in (previous or "").split("; ") if part.startswith(DEAD_JOB_MARK)]
    parts = ([model_reason] if model_reason else []) + kept
    return "; ".join(parts) or None


def _mark(connection: Connection, event_pk: int, outcome: str, now: float) -> None:
    connection.execute(_MARK, {"event_pk": event_pk, "outcome": outcome, "processed_at": now})


@lru_cache(maxsize=1)
def _default_processor() -> Processor:
    return Processor(load_settings())


class _DefaultHandler:
    """The default `process_event` handler: settings from the environment of this process.

    Callable as a plain handler (`handler(engine, job)`), and with `run_in(connection, job)`
    so the worker can run a claimed batch in one transaction."""

    def __call__(self, engine: Engine, job: Job) -> None:
        _default_processor()(engine, job)

    def run_in(self, connection: Connection, job: Job) -> None:
        _default_processor().run_in(connection, job)


handle_process_event = _DefaultHandler()


def on_job_dead(connection: Connection, job: Job) -> None:
    """A dead job's event is marked failed and its invoice, when known, flagged for a person."""
    if job.event_pk is None:
        return
    now = time.time()
    _mark(connection, job.event_pk, "failed", now)
    key = job.ordering_key
    if key.startswith("charge:"):
        resolved = invoice_for_charge(connection, key.removeprefix("charge:"))
        if resolved is None:
            return
        key = resolved
    elif key.startswith("event:"):
        return
    flag = f"{DEAD_JOB_MARK} {job.id} (event {job.event_pk}): {job.last_error or 'no error kept'}"
    current = connection.execute(
        sa.select(invoices.c.attention).where(invoices.c.id == key)
    ).scalar_one_or_none()
    combined = "; ".join(part for part in (current, flag) if part)
    connection.execute(
        invoices.update().where(invoices.c.id == key).values(attention=combined, updated_at=now)
    )
