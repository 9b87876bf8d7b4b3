"""Plain replay: every selected stored event through the worker's own code, a group per commit.

`apply_events` decodes the stored raw events chunk by chunk on one held connection. An event
that would change nothing in the invoice state read at the start of its chunk (`_Known`) is
settled without a write transaction; the others go through `Processor.apply_events` — the
worker's code — GROUP at a time in one transaction, and a group that any event refuses is rolled
back and applied again one event at a time with `Processor.apply_event`. Re-application is
idempotent, so an interrupted replay is finished by running it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.applying import Arrived, InvoiceNotYetKnown
from billhook.billing import BillingEvent, InvoiceState, apply
from billhook.config import Settings
from billhook.errors import StoreUnavailable, UnprocessableEvent
from billhook.ops.replay_failure import EventFailure, event_failure
from billhook.ops.replay_selection import StoredEvent, chunks, load_events
from billhook.processing import Processor, decode_event
from billhook.store.engine import DRIVER_ERRORS
from billhook.store.events import Outcome, mark_outcomes
from billhook.store.invoices import (
    ConcurrentUpdate,
    StoredInvoice,
    charge_invoices,
    load_invoices,
)

# A worker may write the same invoice meanwhile; the loser re-reads and applies again.
CONCURRENT_RETRIES = 5
# Events applied per transaction: one commit for many, while the write lock is held briefly.
GROUP = 100


@dataclass(frozen=True)
class Applied:
    """What a replay did with its events: applied (or found already applied), ignored, failed."""

    applied: int = 0
    ignored: int = 0
    failed: tuple[EventFailure, ...] = ()


def apply_events(
    engine: Engine,
    event_pks: Sequence[int],
    *,
    settings: Settings,
    clock: Callable[[], float],
    on_event: Callable[[], None] | None = None,
) -> Applied:
    """Every event in `event_pks` (provider order) applied; `on_event` is called once per event."""
    applier = _Applier(engine, settings, on_event, clock)
    applier.apply_all(event_pks)
    return Applied(applier.applied, applier.ignored, tuple(applier.failed))


@dataclass
class _Applier:
    engine: Engine
    settings: Settings
    on_event: Callable[[], None] | None
    clock: Callable[[], float]
    applied: int = 0
    ignored: int = 0
    failed: list[EventFailure] = field(default_factory=list)

    def apply_all(self, event_pks: Sequence[int]) -> None:
        processor = Processor(self.settings, clock=self.clock)
        # One connection; events that change something are applied GROUP at a time in one
        # transaction (one commit), and between two groups no transaction is open (SQLite's write
        # lock is free for ingest and the workers). A group is all or nothing and re-application
        # is idempotent, so an interrupted replay is finished by running it again.
        with self.engine.connect() as connection:
            for chunk in chunks(event_pks):
                with _begin(connection):
                    decoded = [_decoded(stored) for stored in load_events(connection, chunk)]
                    known = _Known.read(connection, [d.event for d in decoded if d.event])
                marks: dict[Outcome, list[int]] = {"processed": [], "ignored": []}
                pending: list[_Decoded] = []
                for item in decoded:
                    if self._settled(item, known, marks):
                        self._tick(1)
                    else:
                        pending.append(item)
                for start in range(0, len(pending), GROUP):
                    group = pending[start : start + GROUP]
                    if not self._apply_group(connection, processor, group):
                        # Something in the group needs its own transaction (a concurrent
                        # writer, an event that fails): the group again, one event at a time.
                        for item in group:
                            self._apply_one(connection, processor, item)
                    self._tick(len(group))
                with _begin(connection):
                    now = self.clock()
                    for outcome, pks in marks.items():
                        if pks:
                            mark_outcomes(connection, pks, outcome, now=now)

    def _tick(self, count: int) -> None:
        if self.on_event is not None:
            for _ in range(count):
                self.on_event()

    def _settled(self, item: _Decoded, known: _Known, marks: dict[Outcome, list[int]]) -> bool:
        """Settle what needs no write transaction; False for events to apply."""
        stored, event = item.stored, item.event
        if item.error is not None:
            self._fail(stored, item.error)
            return True
        if event is None:
            self.ignored += 1
            if stored.outcome != "ignored":
                marks["ignored"].append(stored.pk)
            return True
        if known.already_applied(event):
            # The same no-op `apply_event` would find, without a transaction per event.
            self.applied += 1
            if stored.outcome != "processed":
                marks["processed"].append(stored.pk)
            return True
        return False

    def _apply_group(
        self, connection: Connection, processor: Processor, group: Sequence[_Decoded]
    ) -> bool:
        """All of `group` in one transaction; False (nothing written) if any event refused."""
        arrivals = [
            Arrived(item.event, item.stored.source, item.stored.pk) for item in group if item.event
        ]
        try:
            with _begin(connection):
                outcomes = processor.apply_events(connection, arrivals)
                if any(outcome is not None for outcome in outcomes):
                    raise _GroupRefused
                unmarked = [item.stored.pk for item in group if item.stored.outcome != "processed"]
                if unmarked:
                    mark_outcomes(connection, unmarked, "processed", now=self.clock())
        except (_GroupRefused, ConcurrentUpdate, sa.exc.IntegrityError):
            return False
        self.applied += len(group)
        return True

    def _apply_one(self, connection: Connection, processor: Processor, item: _Decoded) -> None:
        stored, event = item.stored, item.event
        assert event is not None
        for attempt in range(CONCURRENT_RETRIES):
            try:
                with _begin(connection):
                    processor.apply_event(
                        connection, event, source=stored.source, event_pk=stored.pk
                    )
                    if stored.outcome != "processed":
                        mark_outcomes(connection, [stored.pk], "processed", now=self.clock())
            except ConcurrentUpdate as exc:
                if attempt + 1 == CONCURRENT_RETRIES:
                    self._fail(stored, exc)
                continue
            except (UnprocessableEvent, InvoiceNotYetKnown) as exc:
                self._fail(stored, exc)
                return
            except ValueError as exc:  # the stored invoice state is unreadable
                self._fail(stored, ValueError(f"{exc}; mend it with --invoice ID --rebuild"))
                return
            self.applied += 1
            return

    def _fail(self, stored: StoredEvent, exc: Exception) -> None:
        self.failed.append(event_failure(stored, exc))


@dataclass(frozen=True)
class _Decoded:
    stored: StoredEvent
    event: BillingEvent | None
    error: Exception | None


def _decoded(stored: StoredEvent) -> _Decoded:
    try:
        return _Decoded(stored, decode_event(stored.source, stored.body), None)
    except UnprocessableEvent as exc:
        return _Decoded(stored, None, exc)


@dataclass(frozen=True)
class _Known:
    """Invoice states and charge links as read at the start of a chunk.

    A state only grows (it is a join of facts), so an event that changes nothing in the state
    read here changes nothing in any later one: replaying it needs no transaction. Anything
    else goes through `Processor.apply_event`.
    """

    states: dict[str, InvoiceState]
    links: dict[str, str]

    @classmethod
    def read(cls, connection: Connection, batch: Sequence[BillingEvent]) -> _Known:
        charge_only = {e.charge_id for e in batch if e.charge_id and e.invoice_id is None}
        links = charge_invoices(connection, sorted(charge_only))
        ids = {e.invoice_id or links.get(e.charge_id or "") for e in batch} - {None, ""}
        stored = load_invoices(connection, [i for i in ids if i], lock=False)
        # An unreadable state is left out: the full path reports it.
        states = {i: read.state for i, read in stored.items() if isinstance(read, StoredInvoice)}
        # An event naming its invoice and a charge is applied only once the link is stored too;
        # that matters only where its invoice is stored (else it is not applied anyway).
        linking = {
            e.charge_id
            for e in batch
            if e.charge_id and e.invoice_id in states and e.charge_id not in links
        }
        links.update(charge_invoices(connection, sorted(linking)))
        return cls(states, links)

    def already_applied(self, event: BillingEvent) -> bool:
        if event.charge_id is not None and event.charge_id not in self.links:
            return False
        invoice_id = event.invoice_id or self.links.get(event.charge_id or "")
        state = None if invoice_id is None else self.states.get(invoice_id)
        if invoice_id is None or state is None:
            return False
        applied = apply(state, event.with_invoice(invoice_id))
        return applied.state == state and not applied.changes


class _GroupRefused(Exception):
    """An event of a group needs its own transaction: roll the group back."""


@contextmanager
def _begin(connection: Connection) -> Iterator[None]:
    """A transaction on a held connection; driver errors become `StoreUnavailable`."""
    try:
        with connection.begin():
            yield
    except DRIVER_ERRORS as exc:
        raise StoreUnavailable(
            f"the database failed during the replay: {exc.orig or exc}; the events before it "
            "are committed, run the same replay again to finish"
        ) from exc
