"""Rebuild: one invoice recomputed from all its stored events and written back (`--rebuild`).

The repair after a bug fix, or for a stored state that cannot be read. `fold_rebuild` (the same
fold the dry run shows) starts from an empty state; `rebuild_invoice` writes its result in one
transaction: the charge links, the invoice row and a transition saying it was rebuilt (if any
field changed), and the effects it implies (the outbox skips the keys it already holds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Connection, Engine

from billhook.applying import DEAD_JOB_MARK
from billhook.billing import Change, InvoiceStatus, needs_attention
from billhook.config import Settings
from billhook.effects.outbox import enqueue_effects
from billhook.ops.replay_apply import CONCURRENT_RETRIES, Applied
from billhook.ops.replay_diff import InvoiceDiff, existing_keys
from billhook.ops.replay_rebuild_fold import RebuildFold, fold_rebuild
from billhook.store.engine import transaction
from billhook.store.invoices import (
    ConcurrentUpdate,
    StoredInvoice,
    link_charge,
    record_changes,
    save_invoice,
)


@dataclass(frozen=True)
class Rebuilt:
    """The rebuilt invoice's diff, and what the fold did with its stored events."""

    diff: InvoiceDiff
    applied: Applied


def rebuild_invoice(
    engine: Engine, invoice_id: str, *, settings: Settings, clock: Callable[[], float]
) -> Rebuilt:
    """Fold and write `invoice_id` in one transaction, again if a worker wrote it meanwhile."""
    for attempt in range(CONCURRENT_RETRIES):
        try:
            with transaction(engine) as connection:
                return _write_rebuild(connection, invoice_id, settings, clock)
        except ConcurrentUpdate:
            if attempt + 1 == CONCURRENT_RETRIES:
                raise
    raise AssertionError("unreachable")


def _write_rebuild(
    connection: Connection, invoice_id: str, settings: Settings, clock: Callable[[], float]
) -> Rebuilt:
    fold = fold_rebuild(connection, invoice_id, lock=True)
    assert fold.state is not None
    now = clock()
    diff = fold.diff(outbox=existing_keys(connection, [i.idempotency_key for i in fold.intents]))
    applied = Applied(fold.events, fold.ignored, tuple(fold.failed))
    for charge_id, linked in fold.links:
        link_charge(connection, charge_id, linked, now)
    if diff.changes:
        stored = fold.stored
        save_invoice(
            connection,
            fold.state,
            source=fold.source or "unknown",
            seen=None
            if stored is None
            else StoredInvoice(fold.state, stored.version, stored.attention),
            attention=_attention(fold, settings, clock),
            now=now,
        )
        record_changes(
            connection, invoice_id, [_rebuilt_change(fold, diff)], event_pk=None, now=now
        )
    enqueue_effects(
        connection,
        fold.intents,
        invoice_id=invoice_id,
        event_pk=None,
        now=now,
        settings=settings,
    )
    return Rebuilt(diff, applied)


def _attention(fold: RebuildFold, settings: Settings, clock: Callable[[], float]) -> str | None:
    assert fold.state is not None
    reason = needs_attention(
        fold.state,
        now=clock(),
        held_refund_alert_seconds=settings.held_refund_alert_seconds,
    )
    # A dead-job flag stays until an operator clears it, as processing keeps it.
    previous = "" if fold.stored is None else fold.stored.attention or ""
    kept = [part for part in previous.split("; ") if part.startswith(DEAD_JOB_MARK)]
    return "; ".join(([reason] if reason else []) + kept) or None


def _rebuilt_change(fold: RebuildFold, diff: InvoiceDiff) -> Change:
    assert fold.state is not None
    stored_status = None if fold.stored is None else fold.stored.columns["status"]
    before = stored_status if stored_status in {s.value for s in InvoiceStatus} else None
    fields = ", ".join(f"{c.field}: {c.before} → {c.after}" for c in diff.changes[:6])
    return Change(
        None if before is None else InvoiceStatus(before),
        fold.state.status,
        f"rebuilt by replay from {fold.events} events ({fields})",
    )
