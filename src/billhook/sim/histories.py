"""Random, valid Stripe-shaped provider histories, with the true end state and expected effects.

Pure: the same seed gives the same histories, no clock and no I/O. Every history is one the
provider could really produce: a refund only after the payment, cumulative refunds never above
the amount paid, a void only before payment, failed attempts only before payment, a dispute only
on a paid charge. Event payloads are snapshots of the object when the event was built (as Stripe
builds them), modelled on the fixtures in shared/fixtures/stripe_events.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

API_VERSION = "2023-10-16"
PAID_STATUSES = frozenset({"paid", "partially_refunded", "refunded"})

RECEIPT = "payment_receipt"
REFUND_NOTICE = "refund_notice"
PAYMENT_FAILED = "payment_failed"
EFFECT_KINDS = (RECEIPT, REFUND_NOTICE, PAYMENT_FAILED)

_ALNUM = string.ascii_letters + string.digits
_CURRENCIES = ("usd", "usd", "eur", "gbp", "jpy")


@dataclass(frozen=True)
class ProviderEvent:
    """One event the provider emits; `body` is the exact Stripe event JSON object."""

    event_id: str
    type: str
    created: int
    invoice_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class InvoiceTruth:
    """What the provider knows at the end: what a correct receiver must converge to."""

    invoice_id: str
    status: str
    currency: str
    amount_due: int
    amount_paid: int
    amount_refunded: int
    disputed: bool
    customer_email: str
    charge_id: str | None
    refund_ids: tuple[str, ...]
    failed_attempts: int


@dataclass(frozen=True)
class ExpectedEffect:
    """One effect a correct receiver produces once. `ref` is the refund id or attempt number.

    `required=False` marks an effect a receiver may rightly skip depending on arrival order
    (a payment-failed notice whose failure arrives after the invoice is already paid).
    """

    kind: str
    invoice_id: str
    ref: str
    required: bool = True

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.invoice_id, self.ref)


@dataclass(frozen=True)
class History:
    invoice_id: str
    events: tuple[ProviderEvent, ...]
    truth: InvoiceTruth
    effects: tuple[ExpectedEffect, ...]


@dataclass
class _Invoice:
    """The provider's mutable view of one invoice while its history is generated."""

    id: str
    number: str
    customer: str
    email: str
    currency: str
    amount_due: int
    created: int
    status: str = "draft"
    amount_paid: int = 0
    attempt_count: int = 0
    charge_id: str | None = None
    payment_intent: str | None = None
    transitions: dict[str, int | None] = field(
        default_factory=lambda: {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        }
    )
    refunds: list[dict[str, Any]] = field(default_factory=list)
    dispute_open: bool = False


class _Clock:
    def __init__(self, rng: random.Random, t: int) -> None:
        self._rng = rng
        self.t = t

    def tick(self, low: int = 0, high: int = 5) -> int:
        self.t += self._rng.randint(low, high)  # zero steps on purpose: ties are common
        return self.t


class _Ids:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def __call__(self, prefix: str, length: int = 24) -> str:
        return prefix + "".join(self._rng.choice(_ALNUM) for _ in range(length))


def generate_histories(
    seed: int, count: int, *, start: int = 1_700_000_000, namespace: str = ""
) -> list[History]:
    """`count` independent invoice histories; `namespace` varies ids without changing shapes."""
    rng = random.Random(f"{seed}/{namespace}")
    return [generate_history(rng, index, start) for index in range(count)]


def generate_history(rng: random.Random, index: int, start: int) -> History:
    ids = _Ids(rng)
    t = start + rng.randrange(0, 3600)
    currency = rng.choice(_CURRENCIES)
    inv = _Invoice(
        id=ids("in_"),
        number=f"{ids('', 8).upper()}-{index + 1:04d}",
        customer=ids("cus_", 14),
        email=f"customer{index}@example.com",
        currency=currency,
        amount_due=rng.randrange(100, 50_000),
        created=t,
    )
    events: list[ProviderEvent] = []
    clock = _Clock(rng, t)

    def emit(kind: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        events.append(_event(ids, kind, clock.t, inv.id, obj, previous))

    tick = clock.tick

    emit("invoice.created", _invoice_object(inv))
    roll = rng.random()
    if roll < 0.04:  # a draft nobody finalized
        return _finish(inv, events)

    tick()
    burst_pay = rng.random() < 0.25
    inv.status, inv.transitions["finalized_at"] = "open", clock.t
    if burst_pay:
        # Finalize and pay in one API call: same second, and the finalized snapshot already
        # shows the invoice paid (real Stripe behaviour, see fixtures/SOURCES.md).
        _pay(inv, ids, clock.t)
        snapshot = _invoice_object(inv)
        emit("invoice.finalized", snapshot)
        _emit_payment(emit, inv, snapshot, rng)
    else:
        emit("invoice.finalized", _invoice_object(inv))
        for _ in range(rng.choices((0, 1, 2, 3), (55, 25, 12, 8))[0]):
            tick(0, 30)
            inv.attempt_count += 1
            failed_charge = ids("ch_")
            emit("invoice.payment_failed", {**_invoice_object(inv), "charge": failed_charge})
        tick(0, 30)
        ending = rng.choices(("paid", "void", "uncollectible", "open"), (70, 10, 12, 8))[0]
        if ending == "void":
            inv.status, inv.transitions["voided_at"] = "void", clock.t
            emit("invoice.voided", _invoice_object(inv))
        elif ending == "uncollectible":
            inv.status, inv.transitions["marked_uncollectible_at"] = "uncollectible", clock.t
            emit("invoice.marked_uncollectible", _invoice_object(inv))
            late = rng.random()
            if late < 0.25:  # Stripe lets an uncollectible invoice be paid later...
                tick(1, 60)
                _pay(inv, ids, clock.t)
                _emit_payment(emit, inv, _invoice_object(inv), rng)
            elif late < 0.4:  # ...or voided
                tick(1, 60)
                inv.status, inv.transitions["voided_at"] = "void", clock.t
                emit("invoice.voided", _invoice_object(inv))
        elif ending == "paid":
            _pay(inv, ids, clock.t)
            _emit_payment(emit, inv, _invoice_object(inv), rng)

    if inv.status == "paid":
        _refund_and_dispute(inv, ids, rng, emit, clock)
    return _finish(inv, events)


def _pay(inv: _Invoice, ids: _Ids, t: int) -> None:
    inv.status = "paid"
    inv.amount_paid = inv.amount_due
    inv.attempt_count += 1
    inv.transitions["paid_at"] = t
    inv.charge_id = ids("ch_")
    inv.payment_intent = ids("pi_")


def _emit_payment(emit: Any, inv: _Invoice, snapshot: dict[str, Any], rng: random.Random) -> None:
    # invoice.paid and invoice.payment_succeeded come from one request, in either order.
    pair = ["invoice.paid", "invoice.payment_succeeded"]
    rng.shuffle(pair)
    for kind in pair:
        emit(kind, snapshot)
    if rng.random() < 0.5:
        emit("charge.succeeded", _charge_object(inv))


def _refund_and_dispute(
    inv: _Invoice, ids: _Ids, rng: random.Random, emit: Any, clock: _Clock
) -> None:
    refunds = rng.choices((0, 1, 2, 3), (50, 25, 15, 10))[0]
    for number in range(refunds):
        remaining = inv.amount_paid - sum(r["amount"] for r in inv.refunds)
        if remaining <= 0:
            break
        now = clock.tick(0, 120)
        last = number == refunds - 1
        full = last and rng.random() < 0.5
        amount = remaining if full or remaining < 2 else rng.randrange(1, remaining)
        previous = _charge_object(inv)
        refund: dict[str, Any] = {
            "id": ids("re_"),
            "object": "refund",
            "amount": amount,
            "balance_transaction": ids("txn_"),
            "charge": inv.charge_id,
            "created": now,
            "currency": inv.currency,
            "metadata": {},
            "payment_intent": inv.payment_intent,
            "reason": rng.choice((None, "requested_by_customer", "duplicate")),
            "receipt_number": None,
            "status": "succeeded",
        }
        inv.refunds.insert(0, refund)  # Stripe lists newest first
        emit(
            "charge.refunded",
            _charge_object(inv),
            {
                "amount_refunded": previous["amount_refunded"],
                "refunded": previous["refunded"],
                "refunds": {
                    "data": previous["refunds"]["data"],
                    "total_count": previous["refunds"]["total_count"],
                },
            },
        )
        if rng.random() < 0.4:
            emit("refund.created", dict(refund))
    if inv.amount_paid > sum(r["amount"] for r in inv.refunds) and rng.random() < 0.15:
        clock.tick(1, 600)
        dispute_id = ids("dp_")
        inv.dispute_open = True
        emit("charge.dispute.created", _dispute_object(inv, dispute_id, "needs_response"))
        if rng.random() < 0.6:
            clock.tick(1, 600)
            inv.dispute_open = False
            outcome = rng.choice(("won", "lost"))
            emit("charge.dispute.closed", _dispute_object(inv, dispute_id, outcome))


def _finish(inv: _Invoice, events: list[ProviderEvent]) -> History:
    refunded = sum(r["amount"] for r in inv.refunds)
    status = inv.status
    if status == "paid" and refunded:
        status = "refunded" if refunded >= inv.amount_paid else "partially_refunded"
    failed = sum(1 for e in events if e.type == "invoice.payment_failed")
    truth = InvoiceTruth(
        invoice_id=inv.id,
        status=status,
        currency=inv.currency,
        amount_due=inv.amount_due,
        amount_paid=inv.amount_paid,
        amount_refunded=refunded,
        disputed=inv.dispute_open,
        customer_email=inv.email,
        charge_id=inv.charge_id,
        refund_ids=tuple(r["id"] for r in reversed(inv.refunds)),
        failed_attempts=failed,
    )
    return History(inv.id, tuple(events), truth, expected_effects(truth))


def expected_effects(truth: InvoiceTruth) -> tuple[ExpectedEffect, ...]:
    """The effects a correct receiver produces for this end state (see DESIGN, Billing model)."""
    effects: list[ExpectedEffect] = []
    if truth.status in PAID_STATUSES:
        effects.append(ExpectedEffect(RECEIPT, truth.invoice_id, ""))
    effects.extend(ExpectedEffect(REFUND_NOTICE, truth.invoice_id, r) for r in truth.refund_ids)
    # A failure that arrives after the invoice is settled may rightly be kept quiet.
    still_due = truth.status == "open"
    effects.extend(
        ExpectedEffect(PAYMENT_FAILED, truth.invoice_id, str(n), required=still_due)
        for n in range(1, truth.failed_attempts + 1)
    )
    return tuple(effects)


def _event(
    ids: _Ids,
    kind: str,
    created: int,
    invoice_id: str,
    obj: dict[str, Any],
    previous: dict[str, Any] | None,
) -> ProviderEvent:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    event_id = ids("evt_")
    body: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": ids("req_", 14), "idempotency_key": None},
        "type": kind,
    }
    return ProviderEvent(event_id, kind, created, invoice_id, body)


def _invoice_object(inv: _Invoice) -> dict[str, Any]:
    paid = inv.status == "paid"
    return {
        "id": inv.id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Simulated Provider, Inc.",
        "amount_due": inv.amount_due,
        "amount_paid": inv.amount_paid,
        "amount_remaining": inv.amount_due - inv.amount_paid,
        "attempt_count": inv.attempt_count,
        "attempted": inv.attempt_count > 0,
        "auto_advance": inv.status in ("draft", "open"),
        "billing_reason": "manual",
        "charge": inv.charge_id,
        "collection_method": "charge_automatically",
        "created": inv.created,
        "currency": inv.currency,
        "customer": inv.customer,
        "customer_email": inv.email,
        "customer_name": None,
        "description": "(simulated by billhook simulate)",
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_sim/{inv.id}",
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": "il_" + inv.id[3:],
                    "object": "line_item",
                    "amount": inv.amount_due,
                    "currency": inv.currency,
                    "description": "1 x Simulated plan",
                    "quantity": 1,
                    "type": "invoiceitem",
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/invoices/{inv.id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": inv.number if inv.status != "draft" else None,
        "paid": paid,
        "paid_out_of_band": False,
        "payment_intent": inv.payment_intent,
        "status": inv.status,
        "status_transitions": dict(inv.transitions),
        "subtotal": inv.amount_due,
        "total": inv.amount_due,
        "webhooks_delivered_at": inv.created,
    }


def _charge_object(inv: _Invoice) -> dict[str, Any]:
    refunded = sum(r["amount"] for r in inv.refunds)
    return {
        "id": inv.charge_id,
        "object": "charge",
        "amount": inv.amount_paid,
        "amount_captured": inv.amount_paid,
        "amount_refunded": refunded,
        "captured": True,
        "created": inv.transitions["paid_at"],
        "currency": inv.currency,
        "customer": inv.customer,
        "disputed": inv.dispute_open,
        "invoice": inv.id,
        "livemode": False,
        "metadata": {},
        "paid": True,
        "payment_intent": inv.payment_intent,
        "receipt_email": inv.email,
        "refunded": refunded >= inv.amount_paid,
        "refunds": {
            "object": "list",
            "data": [dict(r) for r in inv.refunds],
            "has_more": False,
            "total_count": len(inv.refunds),
            "url": f"/v1/charges/{inv.charge_id}/refunds",
        },
        "status": "succeeded",
    }


def _dispute_object(inv: _Invoice, dispute_id: str, status: str) -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": inv.amount_paid - sum(r["amount"] for r in inv.refunds),
        "charge": inv.charge_id,
        "created": inv.transitions["paid_at"],
        "currency": inv.currency,
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "payment_intent": inv.payment_intent,
        "reason": "general",
        "status": status,
    }
