"""Canonical billing events: what the invoice model reads, whoever sent the webhook.

A provider event is a snapshot of an object at the time the event was built, not a delta, so a
`BillingEvent` carries the snapshot's facts (status, status_transitions, amounts, the refunds
listed so far) and the model merges facts; it never trusts arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from billhook.errors import UnprocessableEvent

__all__ = [
    "BillingEvent",
    "Dispute",
    "EventKind",
    "Refund",
    "Transitions",
    "UnprocessableEvent",
    "parse_event",
]


class EventKind(StrEnum):
    """The canonical kinds; the values are the type names of billhook's canonical JSON."""

    CREATED = "invoice.created"
    FINALIZED = "invoice.finalized"
    UPDATED = "invoice.updated"
    PAID = "invoice.paid"
    PAYMENT_FAILED = "invoice.payment_failed"
    VOIDED = "invoice.voided"
    MARKED_UNCOLLECTIBLE = "invoice.marked_uncollectible"
    REFUNDED = "invoice.refunded"
    DISPUTE_OPENED = "invoice.dispute_opened"
    DISPUTE_CLOSED = "invoice.dispute_closed"
    # A successful charge that names its invoice: teaches the charge -> invoice link, no status.
    CHARGE_LINKED = "invoice.charge_linked"


LIFECYCLE_KINDS = frozenset(
    {
        EventKind.CREATED,
        EventKind.FINALIZED,
        EventKind.UPDATED,
        EventKind.PAID,
        EventKind.PAYMENT_FAILED,
        EventKind.VOIDED,
        EventKind.MARKED_UNCOLLECTIBLE,
    }
)

# Refund statuses that mean money is on its way back (Stripe counts pending ones in
# `amount_refunded` too); `failed` and `canceled` refunds return nothing.
REFUND_COUNTED = frozenset({"pending", "succeeded"})
DISPUTE_CLOSED_STATUSES = frozenset({"won", "lost", "warning_closed", "closed"})


@dataclass(frozen=True)
class Transitions:
    """An invoice snapshot's `status_transitions`: when each milestone happened, if it has."""

    finalized_at: float | None = None
    paid_at: float | None = None
    voided_at: float | None = None
    marked_uncollectible_at: float | None = None


@dataclass(frozen=True)
class Refund:
    refund_id: str
    amount: int
    status: str = "succeeded"


@dataclass(frozen=True)
class Dispute:
    dispute_id: str
    status: str
    closed: bool


@dataclass(frozen=True)
class BillingEvent:
    """One provider event in canonical form. Optional fields are None when the event is silent."""

    source: str
    event_id: str
    type: EventKind
    raw_type: str
    occurred_at: float
    invoice_id: str | None
    charge_id: str | None = None
    # The invoice snapshot, as sent (lifecycle kinds only).
    status: str | None = None
    transitions: Transitions = field(default_factory=Transitions)
    number: str | None = None
    currency: str | None = None
    customer_email: str | None = None
    amount_due: int | None = None
    amount_paid: int | None = None
    # Cumulative refunded amount as reported by the snapshot (a charge's `amount_refunded`).
    amount_refunded: int | None = None
    attempt: int | None = None
    refunds: tuple[Refund, ...] = ()
    dispute: Dispute | None = None

    def with_invoice(self, invoice_id: str) -> BillingEvent:
        """The same event, resolved to its invoice (refunds and disputes name only the charge)."""
        return replace(self, invoice_id=invoice_id)

    @property
    def charge_link(self) -> tuple[str, str] | None:
        """(charge_id, invoice_id) when this event names both: a row for `charge_links`."""
        if self.charge_id is not None and self.invoice_id is not None:
            return (self.charge_id, self.invoice_id)
        return None

    @property
    def ordering_key(self) -> str:
        """The invoice when known, else its charge: events of one key are processed in turn."""
        if self.invoice_id is not None:
            return self.invoice_id
        if self.charge_id is not None:
            return f"charge:{self.charge_id}"
        return f"event:{self.event_id}"


def parse_event(source: str, payload: Mapping[str, Any]) -> BillingEvent | None:
    """The canonical event for a stored payload, or None when its type is not about billing.

    Raises `UnprocessableEvent` when a billing type lacks what processing needs.
    """
    # Imported here: the parsers build the dataclasses defined above.
    from billhook.billing import _standard, _stripe

    if source == "stripe":
        return _stripe.parse(payload)
    if source == "standard":
        return _standard.parse(payload)
    raise UnprocessableEvent(f"unknown event source {source!r}: expected 'stripe' or 'standard'")
