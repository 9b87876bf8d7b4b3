"""The invoice model: `apply(state, event)` -> new state, what changed and why, effect intents.

Pure: no I/O, no clock, no database. The state is a join of facts (`state.py`), so the order
and repetition of events do not matter; an effect is emitted when `apply` makes its condition
newly true. Policies are written in docs/billing.md, each with a test in
tests/test_billing_policies.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billhook.billing.events import BillingEvent
from billhook.billing.intents import (
    EffectIntent,
    EffectKind,
    payment_failed_key,
    receipt_key,
    refund_notice_key,
)
from billhook.billing.policy import DEFAULT_POLICY, Policy
from billhook.billing.state import InvoiceState, InvoiceStatus, lifecycle_rank

__all__ = [
    "Applied",
    "Change",
    "InvoiceState",
    "InvoiceStatus",
    "apply",
    "held_since",
    "lifecycle_rank",
    "needs_attention",
    "summarize",
]


@dataclass(frozen=True)
class Change:
    """One line of an invoice's story: a status change, or a fact kept at the same status."""

    from_status: InvoiceStatus | None
    to_status: InvoiceStatus | None
    reason: str

    @property
    def is_status_change(self) -> bool:
        return self.from_status != self.to_status


@dataclass(frozen=True)
class Applied:
    state: InvoiceState
    changes: tuple[Change, ...]
    effects: tuple[EffectIntent, ...]


def apply(
    state: InvoiceState | None, event: BillingEvent, policy: Policy = DEFAULT_POLICY
) -> Applied:
    """Merge one event into an invoice's state; say what changed and which effects are now due."""
    facts = InvoiceState.of_event(event)
    before = state if state is not None else InvoiceState(facts.invoice_id)
    after = before.join(facts)
    return Applied(after, _changes(before, after, event), _effects(before, after, policy))


def _changes(before: InvoiceState, after: InvoiceState, event: BillingEvent) -> tuple[Change, ...]:
    tag = f"{event.raw_type} {event.event_id}"
    old, new = before.status, after.status
    changes: list[Change] = []

    def note(text: str) -> None:
        changes.append(Change(new, new, f"{tag}: {text}"))

    if old != new:
        changes.append(Change(old, new, f"{tag}: {_name(old)} → {_name(new)}"))
    for anomaly in after.anomalies:
        if anomaly not in before.anomalies:
            note(anomaly)
    held_before = {r.refund_id for r in before.held_refunds}
    applied_before = {r.refund_id for r in before.applied_refunds}
    for refund in after.counted_refunds:
        rid, amount = refund.refund_id, refund.amount
        if rid in applied_before:
            continue
        if after.is_paid:
            how = "released (invoice now paid)" if rid in held_before else "applied"
            note(f"refund {rid} of {amount} {how}")
        elif rid not in held_before:
            note(f"refund {rid} of {amount} held: invoice not yet paid")
    for rid, refund in sorted(after.refunds.items()):
        was = before.refunds.get(rid)
        if not refund.counted and (was is None or was.status != refund.status):
            note(f"refund {rid} is {refund.status}: not counted")
    for attempt in sorted(after.failed_attempts.keys() - before.failed_attempts.keys()):
        quiet = " (invoice already settled: recorded only)" if after.is_settled else ""
        note(f"payment attempt {attempt} failed{quiet}")
    for did, dispute in sorted(after.disputes.items()):
        if before.disputes.get(did) != dispute:
            note(f"dispute {did} {'closed' if dispute.closed else 'open'} ({dispute.status})")
    return tuple(changes)


def _effects(before: InvoiceState, after: InvoiceState, policy: Policy) -> tuple[EffectIntent, ...]:
    invoice_id = after.invoice_id
    base = {
        "invoice_id": invoice_id,
        "number": after.number,
        "currency": after.currency,
        "customer_email": after.customer_email,
    }
    intents: list[EffectIntent] = []
    # Policy: a refund known before its payment waits; the receipt goes first, then its notice.
    if after.is_paid and not before.is_paid:
        intents.append(
            EffectIntent(
                EffectKind.PAYMENT_RECEIPT,
                receipt_key(invoice_id),
                {**base, "amount": after.amount_paid},
            )
        )
    applied_before = {r.refund_id for r in before.applied_refunds}
    for refund in after.applied_refunds:
        if refund.refund_id not in applied_before:
            intents.append(
                EffectIntent(
                    EffectKind.REFUND_NOTICE,
                    refund_notice_key(invoice_id, refund.refund_id),
                    {**base, "amount": refund.amount, "refund_id": refund.refund_id},
                )
            )
    if policy.late_failure_notices or not after.is_settled:
        for attempt in sorted(after.failed_attempts.keys() - before.failed_attempts.keys()):
            intents.append(
                EffectIntent(
                    EffectKind.PAYMENT_FAILED_NOTICE,
                    payment_failed_key(invoice_id, attempt),
                    {**base, "amount": after.amount_due, "attempt": attempt},
                )
            )
    return tuple(intents)


def _name(status: InvoiceStatus | None) -> str:
    return "none" if status is None else status.value


def summarize(state: InvoiceState) -> dict[str, Any]:
    """The invoice as the API and `explain` show it (DESIGN contract fields first)."""
    return {
        "id": state.invoice_id,
        "status": None if state.status is None else state.status.value,
        "currency": state.currency,
        "amount_due": state.amount_due,
        "amount_paid": state.amount_paid,
        "amount_refunded": state.amount_refunded,
        "customer_email": state.customer_email,
        "disputed": state.disputed,
        "held_refunds": [
            {"refund_id": r.refund_id, "amount": r.amount, "held_since": r.first_seen_at}
            for r in state.held_refunds
        ],
        "held_amount": state.held_amount,
        "number": state.number,
        "charge_id": state.charge_id,
        "refunds": [
            {"refund_id": r.refund_id, "amount": r.amount, "status": r.status}
            for r in sorted(state.refunds.values(), key=lambda r: (r.first_seen_at, r.refund_id))
        ],
        "failed_attempts": sorted(state.failed_attempts),
        "disputes": [
            {"dispute_id": d.dispute_id, "status": d.status, "closed": d.closed}
            for d in sorted(state.disputes.values(), key=lambda d: d.dispute_id)
        ],
        "milestones": dict(state.milestones),
        "anomalies": list(state.anomalies),
    }


def held_since(state: InvoiceState) -> float | None:
    """Provider time of the oldest refund still waiting for its payment, if any."""
    held = state.held_refunds
    if not held and state.held_amount == 0:
        return None
    return min((r.first_seen_at for r in held), default=None)


def needs_attention(
    state: InvoiceState, *, now: float, held_refund_alert_seconds: float
) -> str | None:
    """Why an operator should look at this invoice now (`invoices.attention`), or None."""
    reasons = list(state.anomalies)
    since = held_since(state)
    if since is not None and now - since >= held_refund_alert_seconds:
        ids = ", ".join(r.refund_id for r in state.held_refunds)
        hours = (now - since) / 3600
        reasons.append(
            f"refund {ids} held for {hours:.1f} h: the invoice was never reported paid; "
            "check the payment at the provider"
        )
    return "; ".join(reasons) or None
