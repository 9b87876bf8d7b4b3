"""Realistic Stripe events for `billhook trigger`, built from real payloads (see SOURCES below).

The JSON files here are copies of public Stripe webhook fixtures (stripe-ruby-mock, MIT;
supabase/stripe-sync-engine, MIT). `build_event` gives one fresh ids, a current `created` time
and amounts that agree with each other, so a sequence of triggers tells one invoice's story.
"""

from __future__ import annotations

import copy
import secrets
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from billhook.errors import InvalidRequest

_HERE = Path(__file__).parent
_DEFAULT_AMOUNT = 2000
_DEFAULT_EMAIL = "customer@example.com"

# type -> (template file, data.object.status to set, or None to keep the template's)
_TYPES: dict[str, tuple[str, str | None]] = {
    "invoice.created": ("invoice.created", "draft"),
    "invoice.finalized": ("invoice.finalized", "open"),
    "invoice.paid": ("invoice.paid", "paid"),
    "invoice.payment_succeeded": ("invoice.payment_succeeded", "paid"),
    "invoice.payment_failed": ("invoice.payment_failed", "open"),
    "invoice.voided": ("invoice.voided", "void"),
    "invoice.marked_uncollectible": ("invoice.finalized", "uncollectible"),
    "charge.refunded": ("charge.refunded", None),
    "charge.dispute.created": ("charge.dispute.created", "warning_needs_response"),
    "charge.dispute.closed": ("charge.dispute.created", "won"),
}

SUPPORTED_TYPES = tuple(_TYPES)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def charge_id_for(invoice_id: str) -> str:
    """The charge that paid `invoice_id`: derived, so refunds and disputes find their invoice."""
    return "ch_" + invoice_id.removeprefix("in_")


def build_event(event_type: str, *, invoice_id: str | None, now: int) -> dict[str, Any]:
    """A Stripe event of `event_type` about `invoice_id` (a new invoice when None)."""
    if event_type not in _TYPES:
        raise InvalidRequest(
            f"cannot build a {event_type!r} event: choose one of {', '.join(SUPPORTED_TYPES)}"
        )
    template, status = _TYPES[event_type]
    event = copy.deepcopy(_template(template))
    invoice = invoice_id or new_id("in")
    charge = charge_id_for(invoice)
    event.update(id=new_id("evt"), type=event_type, created=now, livemode=False)
    event["request"] = {"id": new_id("req"), "idempotency_key": None}
    obj: dict[str, Any] = event["data"]["object"]
    event["data"].pop("previous_attributes", None)
    kind = obj.get("object")
    if kind == "invoice":
        _shape_invoice(obj, invoice, charge, event_type, now)
    elif kind == "charge":
        _shape_refunded_charge(obj, invoice, charge, now)
    elif kind == "dispute":
        obj.update(id=new_id("dp"), charge=charge, amount=_DEFAULT_AMOUNT, created=now)
    if status is not None:
        obj["status"] = status
    return event


def render(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, option=orjson.OPT_INDENT_2)


def _shape_invoice(
    obj: dict[str, Any], invoice: str, charge: str, event_type: str, now: int
) -> None:
    amount = obj.get("amount_due") or _DEFAULT_AMOUNT
    paid = event_type in ("invoice.paid", "invoice.payment_succeeded")
    obj.update(
        id=invoice,
        amount_due=amount,
        amount_paid=amount if paid else 0,
        amount_remaining=0 if paid else amount,
        paid=paid,
        charge=charge if paid or event_type == "invoice.payment_failed" else None,
        customer_email=obj.get("customer_email") or _DEFAULT_EMAIL,
        number=obj.get("number") or f"BH-{invoice[-6:].upper()}",
    )
    if event_type == "invoice.payment_failed":
        obj["attempt_count"] = max(1, int(obj.get("attempt_count") or 1))
    transitions = obj.get("status_transitions")
    if isinstance(transitions, dict):
        transitions.update(
            finalized_at=None if event_type == "invoice.created" else now,
            paid_at=now if paid else None,
            voided_at=now if event_type == "invoice.voided" else None,
            marked_uncollectible_at=now if event_type == "invoice.marked_uncollectible" else None,
        )


def _shape_refunded_charge(obj: dict[str, Any], invoice: str, charge: str, now: int) -> None:
    refund = new_id("re")
    obj.update(
        id=charge,
        invoice=invoice,
        amount=_DEFAULT_AMOUNT,
        amount_captured=_DEFAULT_AMOUNT,
        amount_refunded=_DEFAULT_AMOUNT,
        refunded=True,
    )
    refunds = obj.get("refunds")
    if isinstance(refunds, dict) and refunds.get("data"):
        first = refunds["data"][0]
        first.update(id=refund, amount=_DEFAULT_AMOUNT, charge=charge, created=now)
        refunds.update(data=[first], total_count=1, url=f"/v1/charges/{charge}/refunds")


@cache
def _template(name: str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads((_HERE / f"{name}.json").read_bytes())
    return value
