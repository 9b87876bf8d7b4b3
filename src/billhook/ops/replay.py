"""Replay: re-run stored raw events through the normal pipeline, safely, from the CLI or the API.

`replay(engine, request, settings=, perform=)` is the one use case both call. A dry run
(`preview_replay`) reads only and says what would change; a real replay is an operator action,
audited through `perform` (the audit door: `OperatorAction.perform` in the API, `ops.audit.perform`
as `cli:<user>` in the CLI), and re-applies the events with `Processor` — the worker's own
code — in groups of one transaction on a single connection (`ops.replay_apply`). Re-application
is idempotent (the model is a join, the outbox refuses a key it holds), so a replay can be
interrupted and run again, and it never re-sends an effect unless `resend_effects` names its
kind: then the sent effects of that kind go back to pending under the SAME idempotency key (same
Message-ID), audited with their keys (`ops.replay_resend`). `rebuild` recomputes one invoice from
all its stored events (the repair after a bug fix; `ops.replay_rebuild`).

Exit codes (the CLI's): `EXIT_WOULD_CHANGE` (3) for a dry run that found something to change,
`EXIT_EVENTS_FAILED` (1) for a real replay where some events could not be applied, else 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.errors import InvalidRequest
from billhook.ops.replay_apply import Applied, apply_events
from billhook.ops.replay_diff import EffectPreview, FieldChange, InvoiceDiff
from billhook.ops.replay_failure import EventFailure
from billhook.ops.replay_preview import Preview, preview_replay
from billhook.ops.replay_rebuild import rebuild_invoice
from billhook.ops.replay_resend import Perform, resend_sent_effects
from billhook.ops.replay_selection import ReplayPlan, Selection, parse_time, plan_replay

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
    return perform(
        action="replay",
        params=params,
        operation=lambda: _execute(
            engine,
            request,
            plan,
            settings=settings,
            perform=perform,
            on_event=on_event,
            clock=clock,
        ),
    )


def _execute(
    engine: Engine,
    request: ReplayRequest,
    plan: ReplayPlan,
    *,
    settings: Settings,
    perform: Perform,
    on_event: Callable[[], None] | None,
    clock: Callable[[], float],
) -> ReplayResult:
    diffs: tuple[InvoiceDiff, ...] = ()
    applied: Applied
    if request.rebuild:
        assert request.selection.invoice_id is not None
        rebuilt = rebuild_invoice(
            engine, request.selection.invoice_id, settings=settings, clock=clock
        )
        diffs, applied = (rebuilt.diff,), rebuilt.applied
    else:
        applied = apply_events(
            engine, plan.event_pks, settings=settings, clock=clock, on_event=on_event
        )
    resent = resend_sent_effects(
        engine, plan.invoice_ids, request.resend_effects, perform=perform, clock=clock
    )
    return ReplayResult(
        dry_run=False,
        events=plan.events,
        invoices=len(plan.invoice_ids),
        applied=applied.applied,
        ignored=applied.ignored,
        failed=applied.failed,
        diffs=tuple(diff for diff in diffs if diff.changed),
        unchanged=sum(1 for diff in diffs if not diff.changed),
        rebuilt=request.rebuild,
        resent=resent,
    )
