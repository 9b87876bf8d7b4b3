"""What a replay would do, computed from the stored raw events without writing anything.

For a plain replay each affected invoice starts from its stored state and the selected events
are applied to it in provider order; for a rebuild the invoice starts empty and ALL its stored
events are folded in. Either way the model is the pure `billing.apply`, the same one the worker
runs, so the preview is what the real replay will write. `fold_rebuild` is also what the real
rebuild writes, inside its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.billing import BillingEvent, EffectIntent, InvoiceState, apply, summarize
from billhook.errors import NotFound, UnprocessableEvent
from billhook.ops.replay_selection import (
    CHUNK,
    Selection,
    StoredEvent,
    chunks,
    load_events,
    plan_replay,
)
from billhook.processing import decode_event
from billhook.store.invoices import charge_invoices, events_about, summary_columns
from billhook.store.schema import effects, events, invoices

SUMMARY_COLUMNS = (
    "number",
    "status",
    "disputed",
    "currency",
    "amount_due",
    "amount_paid",
    "amount_refunded",
    "customer_email",
)


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class EffectPreview:
    kind: str
    idempotency_key: str


@dataclass(frozen=True)
class InvoiceDiff:
    """One invoice: its fields before → after, effects not yet in the outbox, effects to resend."""

    invoice_id: str
    known: bool
    events: int
    changes: tuple[FieldChange, ...] = ()
    new_effects: tuple[EffectPreview, ...] = ()
    resend: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.new_effects or self.resend)


@dataclass(frozen=True)
class EventFailure:
    event_id: str
    source: str
    error: str


@dataclass(frozen=True)
class Preview:
    events: int
    invoices: int
    ignored: int
    failed: tuple[EventFailure, ...]
    # Only the invoices that would change; `unchanged` counts the others.
    diffs: tuple[InvoiceDiff, ...]
    unchanged: int

    @property
    def changed(self) -> bool:
        return any(diff.changed for diff in self.diffs)


@dataclass(frozen=True)
class StoredRow:
    columns: dict[str, Any]
    # None when the stored JSON cannot be read (only a rebuild mends that).
    state: InvoiceState | None
    version: int
    attention: str | None
    source: str


@dataclass
class RebuildFold:
    invoice_id: str
    stored: StoredRow | None
    state: InvoiceState | None
    intents: list[EffectIntent] = field(default_factory=list)
    events: int = 0
    ignored: int = 0
    failed: list[EventFailure] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    source: str | None = None

    def diff(self, *, resend: Sequence[str] = (), outbox: set[str] | None = None) -> InvoiceDiff:
        assert self.state is not None
        changes = list(_changes(_stored_view(self.stored), _view(self.state)))
        stored_state = None if self.stored is None else self.stored.state
        if self.stored is not None and stored_state is None:
            changes.append(FieldChange("state", "unreadable", "rebuilt"))
        elif (
            stored_state is not None
            and stored_state.to_dict() != self.state.to_dict()
            and not changes
        ):
            changes.append(FieldChange("state", "stored facts", "facts of the stored events"))
        return InvoiceDiff(
            self.invoice_id,
            known=self.stored is not None,
            events=self.events,
            changes=tuple(changes),
            new_effects=_new_effects(self.intents, outbox or set()),
            resend=tuple(resend),
        )


def preview_replay(
    engine: Engine,
    selection: Selection,
    *,
    rebuild: bool = False,
    resend_effects: str | None = None,
) -> Preview:
    """The dry run: per-invoice diffs and new effects; reads only."""
    selection.check(rebuild=rebuild)
    if rebuild:
        assert selection.invoice_id is not None
        return _preview_rebuild(engine, selection.invoice_id, resend_effects)
    plan = plan_replay(engine, selection)
    folds: dict[str, _Fold] = {}
    links: dict[str, str | None] = {}
    failed: list[EventFailure] = []
    ignored = 0
    for chunk in chunks(plan.event_pks):
        with engine.connect() as connection:
            for stored in load_events(connection, chunk):
                try:
                    event = decode_event(stored.source, stored.body)
                    if event is None:
                        ignored += 1
                        continue
                    invoice_id = _resolve(connection, event, links)
                except UnprocessableEvent as exc:
                    failed.append(_failure(stored, exc))
                    continue
                if invoice_id is None:
                    failed.append(_unknown_charge(stored, event))
                    continue
                fold = folds.get(invoice_id)
                if fold is None:
                    fold = folds[invoice_id] = _Fold(read_row(connection, invoice_id, lock=False))
                if fold.stored is not None and fold.stored.state is None:
                    failed.append(_unreadable(stored, invoice_id))
                    continue
                applied = apply(fold.state, event.with_invoice(invoice_id))
                fold.state = applied.state
                fold.intents.extend(applied.effects)
                fold.events += 1
    invoice_ids = sorted(set(plan.invoice_ids) | set(folds))
    with engine.connect() as connection:
        outbox = existing_keys(
            connection, [i.idempotency_key for f in folds.values() for i in f.intents]
        )
        resend = sent_effects(connection, invoice_ids, resend_effects)
    diffs = [
        _plain_diff(invoice_id, folds.get(invoice_id), outbox, resend.get(invoice_id, ()))
        for invoice_id in invoice_ids
    ]
    changed = tuple(diff for diff in diffs if diff.changed)
    return Preview(
        events=plan.events,
        invoices=len(invoice_ids),
        ignored=ignored,
        failed=tuple(failed),
        diffs=changed,
        unchanged=len(diffs) - len(changed),
    )


def fold_rebuild(connection: Connection, invoice_id: str, *, lock: bool) -> RebuildFold:
    """The invoice folded from an empty state over all its stored events, in provider order."""
    stored = read_row(connection, invoice_id, lock=lock)
    rows = connection.execute(
        sa.select(events.c.id)
        .where(events_about(connection, invoice_id))
        .order_by(sa.func.coalesce(events.c.occurred_at, events.c.received_at), events.c.id)
    ).scalars()
    fold = RebuildFold(invoice_id, stored, None, source=None if stored is None else stored.source)
    for stored_event in load_events(connection, list(rows)):
        try:
            event = decode_event(stored_event.source, stored_event.body)
        except UnprocessableEvent as exc:
            fold.failed.append(_failure(stored_event, exc))
            continue
        if event is None:
            fold.ignored += 1
            continue
        if event.invoice_id not in (None, invoice_id):
            fold.failed.append(
                EventFailure(
                    stored_event.event_id,
                    stored_event.source,
                    f"names invoice {event.invoice_id}, not {invoice_id}: left out of the rebuild",
                )
            )
            continue
        event = event.with_invoice(invoice_id)
        if event.charge_id is not None:
            fold.links.append((event.charge_id, invoice_id))
        applied = apply(fold.state, event)
        fold.state = applied.state
        fold.intents.extend(applied.effects)
        fold.events += 1
        fold.source = fold.source or stored_event.source
    if fold.state is None:
        # Not found: the events to rebuild from (a rebuild never empties an invoice).
        raise NotFound(
            f"no stored billing event about invoice {invoice_id!r}: there is nothing to rebuild "
            "it from; check the id"
        )
    return fold


def read_row(connection: Connection, invoice_id: str, *, lock: bool) -> StoredRow | None:
    query = sa.select(invoices).where(invoices.c.id == invoice_id)
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).mappings().first()
    if row is None:
        return None
    try:
        state: InvoiceState | None = InvoiceState.from_dict(orjson.loads(row["state"]))
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        state = None
    return StoredRow(
        columns={name: row[name] for name in SUMMARY_COLUMNS},
        state=state,
        version=int(row["version"]),
        attention=row["attention"],
        source=row["source"],
    )


def existing_keys(connection: Connection, keys: Sequence[str]) -> set[str]:
    unique = sorted(set(keys))
    found: set[str] = set()
    for start in range(0, len(unique), CHUNK):
        found.update(
            connection.execute(
                sa.select(effects.c.idempotency_key).where(
                    effects.c.idempotency_key.in_(unique[start : start + CHUNK])
                )
            ).scalars()
        )
    return found


def sent_effects(
    connection: Connection, invoice_ids: Sequence[str], kind: str | None
) -> dict[str, tuple[str, ...]]:
    """Keys of the sent effects of `kind` per invoice (what `--resend-effects` puts back)."""
    if kind is None:
        return {}
    found: dict[str, list[str]] = {}
    ids = list(invoice_ids)
    for start in range(0, len(ids), CHUNK):
        rows = connection.execute(
            sa.select(effects.c.invoice_id, effects.c.idempotency_key)
            .where(
                effects.c.invoice_id.in_(ids[start : start + CHUNK]),
                effects.c.kind == kind,
                effects.c.state == "sent",
            )
            .order_by(effects.c.id)
        )
        for row in rows:
            found.setdefault(row.invoice_id, []).append(row.idempotency_key)
    return {invoice_id: tuple(keys) for invoice_id, keys in found.items()}


@dataclass
class _Fold:
    stored: StoredRow | None
    state: InvoiceState | None = None
    intents: list[EffectIntent] = field(default_factory=list)
    events: int = 0

    def __post_init__(self) -> None:
        self.state = None if self.stored is None else self.stored.state


def _preview_rebuild(engine: Engine, invoice_id: str, resend_effects: str | None) -> Preview:
    with engine.connect() as connection:
        fold = fold_rebuild(connection, invoice_id, lock=False)
        outbox = existing_keys(connection, [i.idempotency_key for i in fold.intents])
        resend = sent_effects(connection, [invoice_id], resend_effects)
    diff = fold.diff(resend=resend.get(invoice_id, ()), outbox=outbox)
    return Preview(
        events=fold.events + fold.ignored + len(fold.failed),
        invoices=1,
        ignored=fold.ignored,
        failed=tuple(fold.failed),
        diffs=(diff,) if diff.changed else (),
        unchanged=0 if diff.changed else 1,
    )


def _plain_diff(
    invoice_id: str, fold: _Fold | None, outbox: set[str], resend: Sequence[str]
) -> InvoiceDiff:
    if fold is None or fold.state is None:
        # No event applied (all ignored or failed), or a stored state only a rebuild can read.
        return InvoiceDiff(invoice_id, known=True, events=0, resend=tuple(resend))
    stored_state = None if fold.stored is None else fold.stored.state
    changes: tuple[FieldChange, ...] = ()
    if stored_state is None or stored_state.to_dict() != fold.state.to_dict():
        changes = tuple(_changes(_stored_view(fold.stored), _view(fold.state)))
    return InvoiceDiff(
        invoice_id,
        known=fold.stored is not None,
        events=fold.events,
        changes=changes,
        new_effects=_new_effects(fold.intents, outbox),
        resend=tuple(resend),
    )


def _resolve(
    connection: Connection, event: BillingEvent, links: dict[str, str | None]
) -> str | None:
    """The invoice an event is about, as processing resolves it (invoice id, else its charge)."""
    if event.invoice_id is not None:
        if event.charge_id is not None:
            links.setdefault(event.charge_id, event.invoice_id)
        return event.invoice_id
    if event.charge_id is None:
        raise UnprocessableEvent(
            f"event {event.event_id} ({event.raw_type}) names neither an invoice nor a charge"
        )
    if links.get(event.charge_id) is None:
        links[event.charge_id] = charge_invoices(connection, [event.charge_id]).get(event.charge_id)
    return links[event.charge_id]


def _view(state: InvoiceState) -> dict[str, Any]:
    """The invoice as its row would show it (summary, with the columns' own representation)."""
    summary = summarize(state)
    columns = summary_columns(state)
    return {**summary, **columns}


def _stored_view(stored: StoredRow | None) -> dict[str, Any]:
    if stored is None:
        return {}
    base = summarize(stored.state) if stored.state is not None else {}
    return {**base, **stored.columns, "disputed": bool(stored.columns["disputed"])}


def _changes(before: dict[str, Any], after: dict[str, Any]) -> Iterable[FieldChange]:
    for name, value in after.items():
        if name != "id" and before.get(name) != value:
            yield FieldChange(name, before.get(name), value)


def _new_effects(intents: Iterable[EffectIntent], outbox: set[str]) -> tuple[EffectPreview, ...]:
    seen: dict[str, EffectPreview] = {}
    for intent in intents:
        key = intent.idempotency_key
        if key not in outbox and key not in seen:
            seen[key] = EffectPreview(str(intent.kind), key)
    return tuple(seen.values())


def _failure(stored: StoredEvent, exc: Exception) -> EventFailure:
    return EventFailure(stored.event_id, stored.source, f"{type(exc).__name__}: {exc}")


def _unknown_charge(stored: StoredEvent, event: BillingEvent) -> EventFailure:
    return EventFailure(
        stored.event_id,
        stored.source,
        f"InvoiceNotYetKnown: {event.raw_type} is about charge {event.charge_id}, whose "
        "invoice no stored event names yet",
    )


def _unreadable(stored: StoredEvent, invoice_id: str) -> EventFailure:
    return EventFailure(
        stored.event_id,
        stored.source,
        f"the stored state of invoice {invoice_id} is unreadable; mend it with "
        f"`billhook replay --invoice {invoice_id} --rebuild`",
    )
