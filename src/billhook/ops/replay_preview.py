"""What a replay would do, computed from the stored raw events without writing anything.

For a plain replay each affected invoice starts from its stored state and the selected events
are applied to it in provider order; for a rebuild the invoice starts empty and ALL its stored
events are folded in (`ops.replay_rebuild_fold`). Either way the model is the pure
`billing.apply`, the same one the worker runs, so the preview is what the real replay will write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection, Engine

from billhook.billing import BillingEvent, EffectIntent, InvoiceState, apply
from billhook.errors import UnprocessableEvent
from billhook.ops.replay_diff import (
    FieldChange,
    InvoiceDiff,
    StoredRow,
    existing_keys,
    field_changes,
    folded_view,
    new_effects,
    read_row,
    sent_effects,
    stored_view,
)
from billhook.ops.replay_failure import EventFailure, event_failure
from billhook.ops.replay_rebuild_fold import fold_rebuild
from billhook.ops.replay_selection import Selection, StoredEvent, chunks, load_events, plan_replay
from billhook.processing import decode_event
from billhook.store.invoices import charge_invoices


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
                    failed.append(event_failure(stored, exc))
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
        changes = tuple(field_changes(stored_view(fold.stored), folded_view(fold.state)))
    return InvoiceDiff(
        invoice_id,
        known=fold.stored is not None,
        events=fold.events,
        changes=changes,
        new_effects=new_effects(fold.intents, outbox),
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
