"""Apply parsed events to the stored invoices: many events, one transaction, a few statements.

This is the write half of the imperative shell around the pure model (`billhook.billing`), shared
by the worker (a claimed batch of jobs), replay (a group of selected events) and the one-event
path. For a batch it:

1. resolves refunds and disputes that name only their charge (one read of `charge_links`, plus
   the links earlier events of the same batch make);
2. reads every invoice the batch is about in one statement (row locks on PostgreSQL, taken in
   id order so two workers cannot deadlock; SQLite's write lock is already held);
3. applies the events in the given order in memory: two events about one invoice see each
   other, exactly as if they had been applied one after the other;
4. writes what changed with one executemany per table: invoices (insert or version-checked
   update), transitions, outbox rows, charge links.

An event the model refuses (no invoice known yet, an unreadable stored state, a payload without
what billing needs) fails alone: it is left out of the writes and reported in its slot. A
database refusal (another writer created or moved an invoice first) raises and writes nothing
of the batch; callers then go one event at a time, where each conflict is retried on its own.

Steps 1-3 are `plan_events` and step 4 `write_plan`; `apply_events` runs both in the caller's
transaction. A worker's batch plans before its transaction, reading without row locks on a
connection that holds no SQLite write lock, so the one write lock (SQLite) is held for the
writes alone: the version checks of step 4 refuse the batch if an invoice moved in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from billhook.billing import BillingEvent, InvoiceState, apply, needs_attention
from billhook.config import Settings
from billhook.effects.outbox import effect_rows, insert_effects
from billhook.errors import BillhookError
from billhook.store.invoices import (
    StoredInvoice,
    charge_invoices,
    insert_invoices,
    insert_transitions,
    invoice_columns,
    link_charges,
    load_invoices,
    transition_rows,
    update_invoices,
)

DEAD_JOB_MARK = "dead job"


class InvoiceNotYetKnown(BillhookError):
    """A refund or dispute names a charge whose invoice billhook has not seen yet.

    The job retries with backoff; the invoice's own events usually arrive in the meantime.
    """


@dataclass(frozen=True, slots=True)
class Arrived:
    """One parsed event to apply, with where it is stored (None: not a stored event)."""

    event: BillingEvent
    source: str
    event_pk: int | None


@dataclass
class _Invoice:
    """An invoice as the batch sees it: what was read, and what applying made of it."""

    seen: StoredInvoice | None
    state: InvoiceState | None
    attention: str | None
    source: str
    dirty: bool = False


@dataclass
class Plan:
    """What applying a batch writes (`plan_events`), and each event's outcome."""

    outcomes: list[Exception | None]
    new_links: dict[str, str]
    created: list[dict[str, Any]]
    updated: list[tuple[StoredInvoice, dict[str, Any]]]
    transitions: list[dict[str, Any]]
    outbox: list[dict[str, Any]]
    now: float


def apply_events(
    connection: Connection, batch: Sequence[Arrived], *, settings: Settings, now: float
) -> list[Exception | None]:
    """Apply `batch` in order inside the caller's transaction; one slot per event: None when
    it is applied (or was already), else the reason it was not."""
    plan = plan_events(connection, batch, settings=settings, now=now, lock=True)
    write_plan(connection, plan)
    return plan.outcomes


def plan_events(
    connection: Connection,
    batch: Sequence[Arrived],
    *,
    settings: Settings,
    now: float,
    lock: bool,
) -> Plan:
    """Read what `batch` is about and apply it in memory (steps 1-3). `lock` takes the
    invoices' row locks (PostgreSQL, inside the transaction that writes the plan); without it
    `write_plan`'s version checks are what catches an invoice that moved since."""
    outcomes: list[Exception | None] = [None] * len(batch)
    # Only events that name a charge and no invoice need the stored links. A link an event of
    # this batch makes for a charge not read here is inserted as `ON CONFLICT DO NOTHING`, so a
    # charge already linked keeps its invoice whether or not it was read.
    links = charge_invoices(
        connection,
        sorted(
            {a.event.charge_id for a in batch if a.event.charge_id and a.event.invoice_id is None}
        ),
    )
    new_links: dict[str, str] = {}
    resolved: list[BillingEvent | None] = []
    for slot, arrived in enumerate(batch):
        event = arrived.event
        if event.invoice_id is None and event.charge_id is not None:
            invoice_id = links.get(event.charge_id)
            if invoice_id is None:
                outcomes[slot] = _not_yet_known(event)
                resolved.append(None)
                continue
            event = event.with_invoice(invoice_id)
        elif event.invoice_id is None:
            outcomes[slot] = InvoiceNotYetKnown(
                f"event {event.event_id} ({event.raw_type}) names neither an invoice nor a charge"
            )
            resolved.append(None)
            continue
        link = event.charge_link
        if link is not None and link[0] not in links:
            # The first invoice named for a charge keeps it (the table refuses a second).
            links[link[0]] = new_links[link[0]] = link[1]
        resolved.append(event)

    wanted = sorted({e.invoice_id for e in resolved if e is not None and e.invoice_id})
    stored = load_invoices(connection, wanted, lock=lock)
    invoices: dict[str, _Invoice] = {}
    transitions: list[dict[str, Any]] = []
    outbox: list[dict[str, Any]] = []
    for slot, (arrived, known) in enumerate(zip(batch, resolved, strict=True)):
        if known is None:
            continue
        event = known
        assert event.invoice_id is not None
        invoice = invoices.get(event.invoice_id)
        if invoice is None:
            read = stored.get(event.invoice_id)
            if isinstance(read, Exception):
                outcomes[slot] = read
                continue
            invoice = invoices[event.invoice_id] = _Invoice(
                read,
                None if read is None else read.state,
                None if read is None else read.attention,
                arrived.source,
            )
        applied = apply(invoice.state, event)
        if invoice.state is not None and applied.state == invoice.state and not applied.changes:
            continue
        invoice.state = applied.state
        invoice.attention = merge_attention(
            needs_attention(
                applied.state, now=now, held_refund_alert_seconds=settings.held_refund_alert_seconds
            ),
            invoice.attention,
        )
        invoice.dirty = True
        transitions += transition_rows(
            event.invoice_id, applied.changes, event_pk=arrived.event_pk, now=now
        )
        outbox += effect_rows(
            applied.effects,
            invoice_id=event.invoice_id,
            event_pk=arrived.event_pk,
            now=now,
            settings=settings,
        )

    created: list[dict[str, Any]] = []
    updated: list[tuple[StoredInvoice, dict[str, Any]]] = []
    for invoice in invoices.values():
        if not invoice.dirty:
            continue
        assert invoice.state is not None
        columns = invoice_columns(invoice.state, invoice.attention, now)
        if invoice.seen is None:
            created.append({"id": invoice.state.invoice_id, "source": invoice.source, **columns})
        else:
            updated.append((invoice.seen, columns))
    return Plan(outcomes, new_links, created, updated, transitions, outbox, now)


def write_plan(connection: Connection, plan: Plan) -> None:
    """Write `plan` in the caller's transaction (step 4); `ConcurrentUpdate` if an invoice was
    created or moved since it was read."""
    link_charges(connection, plan.new_links, plan.now)
    insert_invoices(connection, plan.created, now=plan.now)
    update_invoices(connection, plan.updated)
    insert_transitions(connection, plan.transitions)
    insert_effects(connection, plan.outbox)


def _not_yet_known(event: BillingEvent) -> InvoiceNotYetKnown:
    return InvoiceNotYetKnown(
        f"{event.raw_type} {event.event_id} is about charge {event.charge_id}, whose invoice "
        "has not been seen yet; retrying until an invoice event names that charge"
    )


def merge_attention(model_reason: str | None, previous: str | None) -> str | None:
    """The model's reasons, plus any dead-job flag an operator has not cleared yet."""
    kept = [part for part in (previous or "").split("; ") if part.startswith(DEAD_JOB_MARK)]
    parts = ([model_reason] if model_reason else []) + kept
    return "; ".join(parts) or None
