"""The rebuild's fold: one invoice recomputed from an empty state over all its stored events.

`fold_rebuild` reads only; the dry run shows its `RebuildFold.diff`, and the real rebuild
(`ops.replay_rebuild`) writes its result inside its own transaction, with the row locked. The
model is the pure `billing.apply`, the same one the worker runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billhook.billing import EffectIntent, InvoiceState, apply
from billhook.errors import NotFound, UnprocessableEvent
from billhook.ops.replay_diff import (
    FieldChange,
    InvoiceDiff,
    StoredRow,
    field_changes,
    folded_view,
    new_effects,
    read_row,
    stored_view,
)
from billhook.ops.replay_failure import EventFailure, event_failure
from billhook.ops.replay_selection import load_events
from billhook.processing import decode_event
from billhook.store.invoices import events_about
from billhook.store.schema import events


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
        changes = list(field_changes(stored_view(self.stored), folded_view(self.state)))
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
            new_effects=new_effects(self.intents, outbox or set()),
            resend=tuple(resend),
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
            fold.failed.append(event_failure(stored_event, exc))
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
