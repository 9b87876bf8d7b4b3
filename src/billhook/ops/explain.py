"""`explain`: an invoice and its whole story, in time order.

The story is every delivery of every event about the invoice (duplicates included), every
change the model made and the event that caused it, and every effect with each attempt and its
outcome. Events "about" an invoice are those keyed on it, those keyed on one of its charges
(refunds, disputes) and any event a recorded change names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.billing import InvoiceState, summarize
from billhook.effects.timeline import effect_timeline
from billhook.errors import NotFound
from billhook.store.invoices import events_about
from billhook.store.schema import (
    deliveries,
    event_outcomes,
    events,
    events_with_outcomes,
    invoice_transitions,
    invoices,
    jobs,
)


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    kind: str  # delivery | change | note | effect | job
    summary: str
    event_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    invoice: dict[str, Any]
    timeline: list[TimelineEntry]

    def as_dict(self) -> dict[str, Any]:
        return {"invoice": self.invoice, "timeline": [asdict(entry) for entry in self.timeline]}


def explain_invoice(engine: Engine, invoice_id: str) -> Explanation:
    with engine.connect() as connection:
        row = connection.execute(sa.select(invoices).where(invoices.c.id == invoice_id)).first()
        changes = connection.execute(
            sa.select(invoice_transitions, events.c.event_id, events.c.type)
            .select_from(
                invoice_transitions.outerjoin(events, events.c.id == invoice_transitions.c.event_pk)
            )
            .where(invoice_transitions.c.invoice_id == invoice_id)
            .order_by(invoice_transitions.c.id)
        ).all()
        about = events_about(connection, invoice_id)
        arrivals = connection.execute(
            sa.select(
                deliveries.c.received_at,
                deliveries.c.outcome,
                events.c.id,
                events.c.event_id,
                events.c.type,
                events.c.source,
                event_outcomes.c.outcome.label("processing"),
            )
            .select_from(
                deliveries.join(events_with_outcomes, events.c.id == deliveries.c.event_pk)
            )
            .where(about)
            .order_by(deliveries.c.received_at, deliveries.c.id)
        ).all()
        failing_jobs = connection.execute(
            sa.select(
                jobs.c.id, jobs.c.state, jobs.c.attempts, jobs.c.last_error, events.c.event_id
            )
            .select_from(jobs.join(events, events.c.id == jobs.c.event_pk))
            .where(about, jobs.c.state.in_(("retryable", "dead")))
            .order_by(jobs.c.id)
        ).all()
    if row is None and not arrivals:
        raise NotFound(
            f"no invoice {invoice_id!r} and no event about it; check the id "
            "(Stripe invoice ids start with in_)"
        )
    return Explanation(
        _invoice(row, invoice_id), _timeline(arrivals, changes, failing_jobs, engine, invoice_id)
    )


def _invoice(row: Any, invoice_id: str) -> dict[str, Any]:
    if row is None:
        return {"id": invoice_id, "status": None, "known": False}
    summary = summarize(InvoiceState.from_dict(orjson.loads(row.state)))
    return {**summary, "attention": row.attention, "updated_at": row.updated_at, "known": True}


def _timeline(
    arrivals: Any, changes: Any, failing_jobs: Any, engine: Engine, invoice_id: str
) -> list[TimelineEntry]:
    entries: list[TimelineEntry] = []
    for arrival in arrivals:
        entries.append(
            TimelineEntry(
                at=arrival.received_at,
                kind="delivery",
                summary=f"{arrival.type} received ({arrival.outcome}), "
                f"processing: {arrival.processing or 'waiting'}",
                event_id=arrival.event_id,
                detail={"source": arrival.source, "delivery": arrival.outcome},
            )
        )
    for change in changes:
        is_status = change.from_status != change.to_status
        entries.append(
            TimelineEntry(
                at=change.at,
                kind="change" if is_status else "note",
                summary=change.reason,
                event_id=change.event_id,
                detail={"from": change.from_status, "to": change.to_status},
            )
        )
    for job in failing_jobs:
        entries.append(
            TimelineEntry(
                at=0.0,
                kind="job",
                summary=f"job {job.id} {job.state} after {job.attempts} attempt(s): "
                f"{job.last_error or ''}".strip(),
                event_id=job.event_id,
            )
        )
    for effect in effect_timeline(engine, invoice_id):
        entries.append(
            TimelineEntry(
                at=effect.created_at,
                kind="effect",
                summary=f"{effect.kind} via {effect.channel} queued ({effect.idempotency_key})",
                detail={"effect_id": effect.id, "state": effect.state},
            )
        )
        for attempt in effect.history:
            outcome = attempt.outcome + (f": {attempt.error}" if attempt.error else "")
            entries.append(
                TimelineEntry(
                    at=attempt.finished_at or attempt.started_at,
                    kind="effect",
                    summary=f"{effect.kind} via {effect.channel} attempt {attempt.attempt} "
                    f"{outcome}",
                    detail={"effect_id": effect.id, "outcome": attempt.outcome},
                )
            )
        if effect.resends:
            entries.append(
                TimelineEntry(
                    at=effect.sent_at or effect.created_at,
                    kind="effect",
                    summary=f"{effect.kind} handed over {effect.resends + 1} times under the "
                    f"same key {effect.idempotency_key} (a dispatcher stopped mid-send)",
                    detail={"effect_id": effect.id, "resends": effect.resends},
                )
            )
    # Failing jobs have no single moment: they go last, where an operator reads first.
    return sorted(entries, key=lambda entry: (entry.at == 0.0, entry.at))
