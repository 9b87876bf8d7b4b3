"""Stripe event envelopes -> canonical billing events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billhook.billing._fields import (
    id_of,
    obj,
    opt_int,
    opt_obj,
    opt_str,
    opt_time,
    req_int,
    req_str,
)
from billhook.billing.events import (
    DISPUTE_CLOSED_STATUSES,
    BillingEvent,
    Dispute,
    EventKind,
    Refund,
    Transitions,
)
from billhook.errors import UnprocessableEvent

SOURCE = "stripe"

_INVOICE_TYPES = {
    "invoice.created": EventKind.CREATED,
    "invoice.finalized": EventKind.FINALIZED,
    "invoice.updated": EventKind.UPDATED,
    "invoice.paid": EventKind.PAID,
    "invoice.payment_succeeded": EventKind.PAID,
    "invoice.payment_failed": EventKind.PAYMENT_FAILED,
    "invoice.voided": EventKind.VOIDED,
    "invoice.marked_uncollectible": EventKind.MARKED_UNCOLLECTIBLE,
}
# `charge.refund.updated` is the older name of `refund.updated`; all carry one refund object.
_REFUND_TYPES = frozenset({"refund.created", "refund.updated", "charge.refund.updated"})
_DISPUTE_TYPES = {
    "charge.dispute.created": EventKind.DISPUTE_OPENED,
    "charge.dispute.closed": EventKind.DISPUTE_CLOSED,
}
_CHARGE_TYPES = frozenset({"charge.refunded", "charge.succeeded"})

HANDLED_TYPES = (
    frozenset(_INVOICE_TYPES) | _REFUND_TYPES | frozenset(_DISPUTE_TYPES) | _CHARGE_TYPES
)


def parse(payload: Mapping[str, Any]) -> BillingEvent | None:
    raw_type = payload.get("type")
    if raw_type not in HANDLED_TYPES:
        return None
    assert isinstance(raw_type, str)
    where = f"Stripe {raw_type}"
    event_id = req_str(payload, "id", where)
    where = f"Stripe {raw_type} {event_id}"
    created = opt_time(payload, "created", where)
    if created is None:
        raise UnprocessableEvent(f"{where}: 'created' is missing; processing orders by it")
    data = obj(payload, "data", where)
    item = obj(data, "object", where)
    where += " data.object"
    envelope = {"event_id": event_id, "raw_type": raw_type, "occurred_at": created}
    if raw_type in _INVOICE_TYPES:
        return _invoice(item, _INVOICE_TYPES[raw_type], where, envelope)
    if raw_type in _REFUND_TYPES:
        return _refund_object(item, where, envelope)
    if raw_type in _DISPUTE_TYPES:
        return _dispute(item, _DISPUTE_TYPES[raw_type], where, envelope)
    if raw_type == "charge.refunded":
        return _charge_refunded(item, where, envelope)
    return _charge_succeeded(item, where, envelope)


def _invoice(
    item: Mapping[str, Any], kind: EventKind, where: str, envelope: dict[str, Any]
) -> BillingEvent:
    transitions = opt_obj(item, "status_transitions", where) or {}
    tw = where + ".status_transitions"
    attempt = opt_int(item, "attempt_count", where) if kind is EventKind.PAYMENT_FAILED else None
    return BillingEvent(
        source=SOURCE,
        type=kind,
        invoice_id=req_str(item, "id", where),
        charge_id=id_of(item, "charge", where),
        status=opt_str(item, "status", where),
        transitions=Transitions(
            finalized_at=opt_time(transitions, "finalized_at", tw),
            paid_at=opt_time(transitions, "paid_at", tw),
            voided_at=opt_time(transitions, "voided_at", tw),
            marked_uncollectible_at=opt_time(transitions, "marked_uncollectible_at", tw),
        ),
        number=opt_str(item, "number", where),
        currency=opt_str(item, "currency", where),
        customer_email=opt_str(item, "customer_email", where),
        amount_due=opt_int(item, "amount_due", where),
        amount_paid=opt_int(item, "amount_paid", where),
        attempt=attempt or None,
        **envelope,
    )


def _refund(item: Mapping[str, Any], where: str) -> Refund:
    return Refund(
        refund_id=req_str(item, "id", where),
        amount=req_int(item, "amount", where),
        status=opt_str(item, "status", where) or "succeeded",
    )


def _refund_object(item: Mapping[str, Any], where: str, envelope: dict[str, Any]) -> BillingEvent:
    refund = _refund(item, where)
    charge_id = id_of(item, "charge", where)
    if charge_id is None:
        raise UnprocessableEvent(
            f"{where}: refund {refund.refund_id} has no 'charge'; billhook finds the invoice "
            "through the charge"
        )
    return BillingEvent(
        source=SOURCE,
        type=EventKind.REFUNDED,
        invoice_id=None,
        charge_id=charge_id,
        currency=opt_str(item, "currency", where),
        refunds=(refund,),
        **envelope,
    )


def _charge_refunded(item: Mapping[str, Any], where: str, envelope: dict[str, Any]) -> BillingEvent:
    charge_id = req_str(item, "id", where)
    listing = opt_obj(item, "refunds", where)
    refunds: list[Refund] = []
    if listing is not None:
        entries = listing.get("data")
        if not isinstance(entries, list):
            raise UnprocessableEvent(f"{where}.refunds: 'data' must be a list of refunds")
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise UnprocessableEvent(f"{where}.refunds.data[{index}] must be a refund object")
            refunds.append(_refund(entry, f"{where}.refunds.data[{index}]"))
    # Since API 2022-11-15 the list is not expanded: the cumulative amount is all there is.
    amount_refunded = opt_int(item, "amount_refunded", where)
    if not refunds and amount_refunded is None:
        raise UnprocessableEvent(f"{where}: neither 'refunds' nor 'amount_refunded' is present")
    return BillingEvent(
        source=SOURCE,
        type=EventKind.REFUNDED,
        invoice_id=id_of(item, "invoice", where),
        charge_id=charge_id,
        currency=opt_str(item, "currency", where),
        amount_refunded=amount_refunded,
        refunds=tuple(refunds),
        **envelope,
    )


def _charge_succeeded(
    item: Mapping[str, Any], where: str, envelope: dict[str, Any]
) -> BillingEvent | None:
    invoice_id = id_of(item, "invoice", where)
    if invoice_id is None:
        return None  # a charge that pays no invoice is not a billing event for billhook
    return BillingEvent(
        source=SOURCE,
        type=EventKind.CHARGE_LINKED,
        invoice_id=invoice_id,
        charge_id=req_str(item, "id", where),
        currency=opt_str(item, "currency", where),
        **envelope,
    )


def _dispute(
    item: Mapping[str, Any], kind: EventKind, where: str, envelope: dict[str, Any]
) -> BillingEvent:
    dispute_id = req_str(item, "id", where)
    charge_id = id_of(item, "charge", where)
    if charge_id is None:
        raise UnprocessableEvent(
            f"{where}: dispute {dispute_id} has no 'charge'; billhook finds the invoice "
            "through the charge"
        )
    status = opt_str(item, "status", where) or (
        "closed" if kind is EventKind.DISPUTE_CLOSED else "needs_response"
    )
    closed = kind is EventKind.DISPUTE_CLOSED or status in DISPUTE_CLOSED_STATUSES
    return BillingEvent(
        source=SOURCE,
        type=kind,
        invoice_id=None,
        charge_id=charge_id,
        currency=opt_str(item, "currency", where),
        dispute=Dispute(dispute_id=dispute_id, status=status, closed=closed),
        **envelope,
    )
