"""Replay: re-run stored raw events through the normal pipeline, safely, from the CLI or the API.

`replay(engine, request, settings=, perform=)` is the one use case both call. A dry run
(`preview_replay`) reads only and says what would change; a real replay is an operator action,
audited through `perform` (the audit door: `OperatorAction.perform` in the API, `ops.audit.perform`
as `cli:<user>` in the CLI), and re-applies each event with `Processor.apply_event` — the worker's
own code — in one transaction per event on a single connection. Re-application is idempotent
(the model is a join, the outbox refuses a key it holds), so a replay can be interrupted and run
again, and it never re-sends an effect unless `resend_effects` names its kind: then the sent
effects of that kind go back to pending under the SAME idempotency key (same Message-ID), audited
with their keys. `rebuild` recomputes one invoice from all its stored events (the repair after a
bug fix).

Exit codes (the CLI's): `EXIT_WOULD_CHANGE` (3) for a dry run that found something to change,
`EXIT_EVENTS_FAILED` (1) for a real replay where some events could not be applied, else 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.applying import DEAD_JOB_MARK, Arrived, InvoiceNotYetKnown
from billhook.billing import (
    BillingEvent,
    Change,
    InvoiceState,
    InvoiceStatus,
    apply,
    needs_attention,
)
from billhook.config import Settings
from billhook.effects.outbox import enqueue_effects
from billhook.errors import InvalidRequest, StoreUnavailable, UnprocessableEvent
from billhook.ops.replay_preview import (
    EffectPreview,
    EventFailure,
    FieldChange,
    InvoiceDiff,
    Preview,
    RebuildFold,
    existing_keys,
    fold_rebuild,
    preview_replay,
    sent_effects,
)
from billhook.ops.replay_selection import (
    ReplayPlan,
    Selection,
    StoredEvent,
    chunks,
    load_events,
    parse_time,
    plan_replay,
)
from billhook.processing import Processor, decode_event
from billhook.store.engine import DRIVER_ERRORS, transaction
from billhook.store.events import Outcome, mark_outcomes
from billhook.store.invoices import (
    ConcurrentUpdate,
    StoredInvoice,
    charge_invoices,
    link_charge,
    load_invoices,
    record_changes,
    save_invoice,
)
from billhook.store.schema import effects

__all__ = [
    "EXIT_EVENTS_FAILED",
    "EXIT_WOULD_CHANGE",
    "RESEND_KINDS",
    "EffectPreview",
    "EventFailure",
    "FieldChange",
    "InvoiceDiff",
    "Perform",
    "Preview",
    "ReplayPlan",
    "ReplayRequest",
    "ReplayResult",
    "Selection",
    "execute_replay",
    "parse_time",
    "plan_replay",
    "preview_replay",
    "replay",
]

EXIT_WOULD_CHANGE = 3
EXIT_EVENTS_FAILED = 1
RESEND_KINDS = ("payment_receipt", "refund_notice", "payment_failed_notice")
# A worker may write the same invoice meanwhile; the loser re-reads and applies again.
CONCURRENT_RETRIES = 5
# Events applied per transaction: one commit for many, while the write lock is held briefly.
GROUP = 100

T = TypeVar("T")


class Perform(Protocol):
    """The audit door an operator action goes through (see `ops.audit.perform`)."""

    def __call__(self, action: str, params: Mapping[str, Any], operation: Callable[[], T]) -> T: ...


@dataclass(frozen=True)
class ReplayRequest:
    selection: Selection
    dry_run: bool = False
    rebuild: bool = False
    resend_effects: str | None = None

    def check(self) -> None:
        self.selection.check(rebuild=self.rebuild)
        if self.resend_effects is not None and self.resend_effects not in RESEND_KINDS:
            raise InvalidRequest(
                f"--resend-effects takes one of {', '.join(RESEND_KINDS)}, "
                f"got {self.resend_effects!r}"
            )

    def params(self) -> dict[str, Any]:
        return {
            **self.selection.params(),
            "dry_run": self.dry_run,
            "rebuild": self.rebuild,
            "resend_effects": self.resend_effects,
        }


@dataclass(frozen=True)
class ReplayResult:
    dry_run: bool
    events: int
    invoices: int
    applied: int = 0
    ignored: int = 0
    failed: tuple[EventFailure, ...] = ()
    # Dry run and rebuild: the invoices that (would) change.
    diffs: tuple[InvoiceDiff, ...] = ()
    unchanged: int = 0
    rebuilt: bool = False
    resent: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return any(diff.changed for diff in self.diffs)

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return EXIT_WOULD_CHANGE if self.changed else 0
        return EXIT_EVENTS_FAILED if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}

    @property
    def audit_outcome(self) -> str:
        """What the audit log records as this replay's outcome."""
        return (
            f"{self.events} events, {self.applied} applied, {self.ignored} ignored, "
            f"{len(self.failed)} failed, {len(self.resent)} effects reset for resend"
            + (", invoice rebuilt" if self.rebuilt else "")
        )

    @classmethod
    def of_preview(cls, preview: Preview) -> ReplayResult:
        return cls(
            dry_run=True,
            events=preview.events,
            invoices=preview.invoices,
            ignored=preview.ignored,
            failed=preview.failed,
            diffs=preview.diffs,
            unchanged=preview.unchanged,
        )


def replay(
    engine: Engine,
    request: ReplayRequest,
    *,
    settings: Settings,
    perform: Perform,
    on_event: Callable[[], None] | None = None,
) -> ReplayResult:
    """Dry run (reads only, not audited) or real replay (audited), as `request` says."""
    request.check()
    if request.dry_run:
        return ReplayResult.of_preview(
            preview_replay(
                engine,
                request.selection,
                rebuild=request.rebuild,
                resend_effects=request.resend_effects,
            )
        )
    return execute_replay(engine, request, settings=settings, perform=perform, on_event=on_event)


def execute_replay(
    engine: Engine,
    request: ReplayRequest,
    *,
    settings: Settings,
    perform: Perform,
    on_event: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> ReplayResult:
    """The real replay, as one audited operator action (`replay`)."""
    request.check()
    plan = plan_replay(engine, request.selection)
    params = {**request.params(), "events": plan.events, "invoices": len(plan.invoice_ids)}
    run = _Run(engine, settings, perform, on_event, clock)
    return perform(action="replay", params=params, operation=lambda: run.execute(request, plan))


@dataclass
class _Run:
    engine: Engine
    settings: Settings
    perform: Perform
    on_event: Callable[[], None] | None
    clock: Callable[[], float]
    applied: int = 0
    ignored: int = 0
    failed: list[EventFailure] = field(default_factory=list)

    def execute(self, request: ReplayRequest, plan: ReplayPlan) -> ReplayResult:
        diffs: tuple[InvoiceDiff, ...] = ()
        if request.rebuild:
            assert request.selection.invoice_id is not None
            diffs = (self._rebuild(request.selection.invoice_id),)
        else:
            self._apply_all(plan.event_pks)
        resent = self._resend(plan.invoice_ids, request.resend_effects)
        return ReplayResult(
            dry_run=False,
            events=plan.events,
            invoices=len(plan.invoice_ids),
            applied=self.applied,
            ignored=self.ignored,
            failed=tuple(self.failed),
            diffs=tuple(diff for diff in diffs if diff.changed),
            unchanged=sum(1 for diff in diffs if not diff.changed),
            rebuilt=request.rebuild,
            resent=resent,
        )

    # -- plain replay: every selected event through the worker's code ------------------------

    def _apply_all(self, event_pks: Sequence[int]) -> None:
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
                            _mark(connection, pks, outcome, now)

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
                    _mark(connection, unmarked, "processed", self.clock())
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
                        _mark(connection, [stored.pk], "processed", self.clock())
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
        self.failed.append(
            EventFailure(stored.event_id, stored.source, f"{type(exc).__name__}: {exc}")
        )

    # -- rebuild: one invoice from all its stored events ------------------------------------

    def _rebuild(self, invoice_id: str) -> InvoiceDiff:
        for attempt in range(CONCURRENT_RETRIES):
            try:
                with transaction(self.engine) as connection:
                    return self._write_rebuild(connection, invoice_id)
            except ConcurrentUpdate:
                if attempt + 1 == CONCURRENT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def _write_rebuild(self, connection: Connection, invoice_id: str) -> InvoiceDiff:
        fold = fold_rebuild(connection, invoice_id, lock=True)
        assert fold.state is not None
        now = self.clock()
        diff = fold.diff(
            outbox=existing_keys(connection, [i.idempotency_key for i in fold.intents])
        )
        self.applied, self.ignored, self.failed = fold.events, fold.ignored, list(fold.failed)
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
                attention=self._attention(fold),
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
            settings=self.settings,
        )
        return diff

    def _attention(self, fold: RebuildFold) -> str | None:
        assert fold.state is not None
        reason = needs_attention(
            fold.state,
            now=self.clock(),
            held_refund_alert_seconds=self.settings.held_refund_alert_seconds,
        )
        # A dead-job flag stays until an operator clears it, as processing keeps it.
        previous = "" if fold.stored is None else fold.stored.attention or ""
        kept = [part for part in previous.split("; ") if part.startswith(DEAD_JOB_MARK)]
        return "; ".join(([reason] if reason else []) + kept) or None

    # -- resend: sent effects of one kind back to pending, same key -------------------------

    def _resend(self, invoice_ids: Sequence[str], kind: str | None) -> tuple[str, ...]:
        if kind is None:
            return ()
        with self.engine.connect() as connection:
            found = sent_effects(connection, invoice_ids, kind)
        keys = [key for per_invoice in found.values() for key in per_invoice]
        if not keys:
            return ()
        params = {"kind": kind, "invoice_ids": sorted(found), "idempotency_keys": keys}
        return self.perform(
            action="resend_effects", params=params, operation=lambda: self._reset(keys)
        )

    def _reset(self, keys: Sequence[str]) -> tuple[str, ...]:
        now = self.clock()
        reset: list[str] = []
        with transaction(self.engine) as connection:
            for start in range(0, len(keys), 500):
                reset += connection.execute(
                    sa.update(effects)
                    .where(
                        effects.c.idempotency_key.in_(list(keys[start : start + 500])),
                        effects.c.state == "sent",
                    )
                    .values(
                        state="pending",
                        attempts=0,
                        run_at=now,
                        lease_expires_at=None,
                        last_error=None,
                    )
                    .returning(effects.c.idempotency_key)
                ).scalars()
        return tuple(sorted(reset))


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


def _mark(connection: Connection, event_pks: Sequence[int], outcome: Outcome, now: float) -> None:
    mark_outcomes(connection, event_pks, outcome, now=now)


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
