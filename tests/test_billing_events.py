"""Canonical billing events from the real Stripe fixtures and from billhook's canonical JSON."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from billhook.billing import (
    BillingEvent,
    EffectKind,
    EventKind,
    InvoiceState,
    InvoiceStatus,
    UnprocessableEvent,
    apply,
    parse_event,
    summarize,
)
from billhook.errors import BillhookError

UNPROCESSABLE = "unprocessable"
# Every fixture file, with what billhook does with it: a canonical kind, None (stored and
# ignored: not a billing event), or UNPROCESSABLE (a billing type missing what processing needs).
EXPECTED: dict[str, EventKind | str | None] = {
    "charge.captured--stripe-ruby-mock.json": None,
    # Old-format sample: no data.object.id, so the dispute cannot be keyed.
    "charge.dispute.closed--stripe-ruby-mock.json": UNPROCESSABLE,
    "charge.dispute.created--stripe-ruby-mock.json": EventKind.DISPUTE_OPENED,
    "charge.dispute.created--stripe-sync-engine.json": EventKind.DISPUTE_OPENED,
    "charge.dispute.funds_withdrawn--stripe-ruby-mock.json": None,
    "charge.failed--stripe-ruby-mock.json": None,
    "charge.failed--stripe-sync-engine.json": None,
    "charge.refund.updated--stripe-ruby-mock.json": EventKind.REFUNDED,
    "charge.refunded--stripe-ruby-mock.json": EventKind.REFUNDED,
    "charge.refunded--stripe-sync-engine.json": EventKind.REFUNDED,
    # A charge that names no invoice is not billhook's business.
    "charge.succeeded--stripe-ruby-mock.json": None,
    "charge.succeeded--stripe-sync-engine.json": EventKind.CHARGE_LINKED,
    "customer.subscription.created--stripe-ruby-mock.json": None,
    "customer.subscription.created--stripe-sync-engine.json": None,
    "customer.subscription.deleted--stripe-ruby-mock.json": None,
    "customer.subscription.deleted--stripe-sync-engine.json": None,
    "customer.subscription.updated--stripe-ruby-mock.json": None,
    "customer.subscription.updated--stripe-sync-engine.json": None,
    "invoice.created--stripe-ruby-mock.json": EventKind.CREATED,
    "invoice.deleted--stripe-sync-engine.json": None,
    "invoice.finalized--stripe-ruby-mock.json": EventKind.FINALIZED,
    "invoice.finalized--stripe-sync-engine.json": EventKind.FINALIZED,
    "invoice.paid--stripe-ruby-mock.json": EventKind.PAID,
    "invoice.paid--stripe-sync-engine.json": EventKind.PAID,
    "invoice.payment_action_required--stripe-ruby-mock.json": None,
    "invoice.payment_failed--stripe-ruby-mock.json": EventKind.PAYMENT_FAILED,
    "invoice.payment_succeeded--stripe-ruby-mock.json": EventKind.PAID,
    "invoice.upcoming--stripe-ruby-mock.json": None,
    "invoice.updated--stripe-ruby-mock.json": EventKind.UPDATED,
    "invoice.updated--stripe-sync-engine.json": EventKind.UPDATED,
    "invoice.voided--stripe-sync-engine.json": EventKind.VOIDED,
    "invoice_payment.paid--stripe-sync-engine.json": None,
    "payment_intent.payment_failed--stripe-ruby-mock.json": None,
    "payment_intent.payment_failed--stripe-sync-engine.json": None,
    "payment_intent.succeeded--stripe-ruby-mock.json": None,
    "payment_intent.succeeded--stripe-sync-engine.json": None,
    "plan.created--stripe-openapi-fixtures3.json": None,
    "refund.created--stripe-sync-engine.json": EventKind.REFUNDED,
}


def _load(fixtures_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((fixtures_dir / "stripe_events" / name).read_text())
    return data


def _event(fixtures_dir: Path, name: str) -> BillingEvent:
    event = parse_event("stripe", _load(fixtures_dir, name))
    assert event is not None
    return event


def test_every_fixture_has_a_decided_outcome(fixtures_dir: Path) -> None:
    files = {p.name for p in (fixtures_dir / "stripe_events").glob("*.json")} - {"_index.json"}
    assert files == set(EXPECTED), "a new fixture: decide what billhook does with it"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_or_is_deliberately_ignored(fixtures_dir: Path, name: str) -> None:
    payload = _load(fixtures_dir, name)
    expected = EXPECTED[name]
    if expected == UNPROCESSABLE:
        with pytest.raises(UnprocessableEvent, match="'id' is missing"):
            parse_event("stripe", payload)
        return
    event = parse_event("stripe", payload)
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert event.type is expected
    assert event.raw_type == payload["type"]
    assert event.event_id == payload["id"]
    assert event.occurred_at == float(payload["created"])
    # Every parsed event applies once it is resolved to an invoice.
    resolved = event if event.invoice_id else event.with_invoice("in_resolved")
    apply(None, resolved)


def test_invoice_snapshot_fields(fixtures_dir: Path) -> None:
    paid = _event(fixtures_dir, "invoice.paid--stripe-sync-engine.json")
    assert paid.invoice_id == "in_1KJqKBJDPojXS6LNJbvLUgEy"
    assert (paid.number, paid.currency, paid.status) == ("60229DE7-0007", "usd", "paid")
    assert (paid.amount_due, paid.amount_paid) == (0, 0)
    assert paid.transitions.paid_at == 1642649110.0
    assert paid.transitions.voided_at is None
    assert paid.charge_link is None  # this invoice snapshot names no charge

    failed = _event(fixtures_dir, "invoice.payment_failed--stripe-ruby-mock.json")
    assert failed.attempt == 1
    assert failed.charge_link == ("ch_000000000000000000000000", "in_000000000000000000000000")

    finalized = _event(fixtures_dir, "invoice.finalized--stripe-sync-engine.json")
    assert finalized.customer_email == "tesst@example.com"


def test_refund_and_dispute_events_name_the_charge(fixtures_dir: Path) -> None:
    refunded = _event(fixtures_dir, "charge.refunded--stripe-sync-engine.json")
    assert refunded.charge_link == ("ch_3Kl36gJDPojXS6LN0DCM4A8l", "in_1KJdKkJDPojXS6LNSwSWkZSN")
    assert [(r.refund_id, r.amount, r.status) for r in refunded.refunds] == [
        ("re_3Kl36gJDPojXS6LN0eP4yPDz", 2500, "succeeded")
    ]
    assert refunded.amount_refunded == 2500

    created = _event(fixtures_dir, "refund.created--stripe-sync-engine.json")
    assert created.invoice_id is None
    assert created.charge_id == "ch_1NirD82eZvKYlo2CIvbtLWuY"
    assert created.ordering_key == "charge:ch_1NirD82eZvKYlo2CIvbtLWuY"
    with pytest.raises(UnprocessableEvent, match="charge_links"):
        apply(None, created)
    assert created.with_invoice("in_1").ordering_key == "in_1"

    dispute = _event(fixtures_dir, "charge.dispute.created--stripe-sync-engine.json")
    assert dispute.dispute is not None
    assert (dispute.dispute.dispute_id, dispute.dispute.closed) == (
        "dp_1MLuxQJDPojXS6LNrukJCBBG",
        False,
    )
    assert dispute.charge_id == "ch_1IqtGAJDPojXS6LNstgEfUji"

    linked = _event(fixtures_dir, "charge.succeeded--stripe-sync-engine.json")
    assert linked.charge_link == ("ch_3KtQThJDPojXS6LN0YmgbxGj", "in_1KJdKkJDPojXS6LNSwSWkZSN")


def test_same_second_burst_in_any_order_gives_one_receipt(fixtures_dir: Path) -> None:
    """finalized, paid and payment_succeeded share `created` and even the event id; the
    finalized snapshot already shows the invoice paid (SOURCES.md)."""
    burst = [
        _event(fixtures_dir, name)
        for name in (
            "invoice.finalized--stripe-ruby-mock.json",
            "invoice.paid--stripe-ruby-mock.json",
            "invoice.payment_succeeded--stripe-ruby-mock.json",
        )
    ]
    finals = []
    for order in itertools.permutations(burst):
        state: InvoiceState | None = None
        keys = []
        for event in order:
            applied = apply(state, event)
            state, keys = applied.state, keys + [e.idempotency_key for e in applied.effects]
        assert state is not None
        assert keys == ["payment_receipt:in_000000000000000000000000"]
        assert state.status is InvoiceStatus.PAID
        assert (state.amount_paid, state.number) == (2000, "EE1DF78D-0001")
        finals.append(state.to_dict())
    assert all(final == finals[0] for final in finals)


def test_the_classic_bad_day_on_real_payloads(fixtures_dir: Path) -> None:
    """A refund before its payment, then invoice.paid three times: held, one receipt, one notice."""
    refund = _event(fixtures_dir, "charge.refunded--stripe-ruby-mock.json")
    paid = _event(fixtures_dir, "invoice.paid--stripe-ruby-mock.json")
    invoice_id = paid.invoice_id
    assert invoice_id is not None
    # The shell learned ch_000… -> in_000… from an earlier event and resolves the refund.
    assert refund.charge_id == paid.charge_id
    first = apply(None, refund.with_invoice(invoice_id))
    assert first.effects == ()
    assert summarize(first.state)["held_refunds"] == [
        {"refund_id": "re_000000000000000000000000", "amount": 100, "held_since": 1648319949.0}
    ]
    assert "held: invoice not yet paid" in first.changes[0].reason
    state, effects = first.state, []
    for _ in range(3):
        applied = apply(state, paid)
        state = applied.state
        effects += [(e.kind, e.idempotency_key) for e in applied.effects]
    assert effects == [
        (EffectKind.PAYMENT_RECEIPT, f"payment_receipt:{invoice_id}"),
        (EffectKind.REFUND_NOTICE, f"refund_notice:{invoice_id}:re_000000000000000000000000"),
    ]
    assert state.status is InvoiceStatus.PARTIALLY_REFUNDED  # 100 of 2000
    assert (state.amount_paid, state.amount_refunded, state.held_refunds) == (2000, 100, ())


def test_hand_edited_void_of_a_paid_invoice_keeps_it_paid(fixtures_dir: Path) -> None:
    """The sync-engine invoice.voided is invoice.paid with the status changed (paid_at set)."""
    paid = _event(fixtures_dir, "invoice.paid--stripe-sync-engine.json")
    voided = _event(fixtures_dir, "invoice.voided--stripe-sync-engine.json")
    for order in ((paid, voided), (voided, paid)):
        state = apply(apply(None, order[0]).state, order[1]).state
        assert state.status is InvoiceStatus.PAID
        assert any("payment wins" in a for a in state.anomalies)


# -- billhook's canonical JSON ------------------------------------------------------------


def _canonical(kind: str = "invoice.paid", **data: Any) -> dict[str, Any]:
    return {
        "id": "evt_c1",
        "type": kind,
        "occurred_at": "2024-05-01T12:00:00Z",
        "data": {"invoice_id": "in_c1", **data},
    }


def test_canonical_json_carries_the_snapshot() -> None:
    event = parse_event(
        "standard",
        _canonical(
            number="INV-7",
            status="paid",
            currency="eur",
            amount_due=1200,
            amount_paid=1200,
            customer_email="a@example.com",
            charge_id="ch_c1",
        ),
    )
    assert event is not None
    assert event.type is EventKind.PAID
    assert event.occurred_at == 1714564800.0
    assert (event.number, event.status, event.currency) == ("INV-7", "paid", "eur")
    assert (event.amount_due, event.amount_paid, event.customer_email) == (
        1200,
        1200,
        "a@example.com",
    )
    assert event.charge_link == ("ch_c1", "in_c1")


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T14:00:00+02:00", 1714564800.0),
        ("2024-05-01T12:00:00.250Z", 1714564800.25),
        ("2024-05-01T12:00:00", 1714564800.0),  # no offset: UTC
        (1714564800, 1714564800.0),
        (1714564800.5, 1714564800.5),
    ],
)
def test_canonical_occurred_at_forms(occurred_at: Any, expected: float) -> None:
    payload = _canonical()
    payload["occurred_at"] = occurred_at
    event = parse_event("standard", payload)
    assert event is not None and event.occurred_at == expected


def test_canonical_refund_dispute_and_attempt() -> None:
    refund = parse_event(
        "standard", _canonical("invoice.refunded", refund={"id": "re_1", "amount": 50})
    )
    assert refund is not None and [(r.refund_id, r.amount, r.status) for r in refund.refunds] == [
        ("re_1", 50, "succeeded")
    ]
    closed = parse_event(
        "standard", _canonical("invoice.dispute_closed", dispute={"id": "dp_1", "status": "won"})
    )
    assert closed is not None and closed.dispute is not None and closed.dispute.closed
    opened = parse_event("standard", _canonical("invoice.dispute_opened", dispute={"id": "dp_1"}))
    assert opened is not None and opened.dispute is not None and not opened.dispute.closed
    failed = parse_event("standard", _canonical("invoice.payment_failed", attempt=3))
    assert failed is not None and failed.attempt == 3


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "e", "type": "customer.created", "data": {}},
        {"id": "e", "type": "invoice.upcoming", "data": {"invoice_id": "in_1"}},
        {"type": "ping"},
    ],
)
def test_canonical_types_that_are_not_billing_are_ignored(payload: dict[str, Any]) -> None:
    assert parse_event("standard", payload) is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"id": "e", "type": "invoice.paid", "occurred_at": 1, "data": {}}, "'invoice_id'"),
        ({"type": "invoice.paid", "occurred_at": 1, "data": {"invoice_id": "i"}}, "'id'"),
        ({"id": "e", "type": "invoice.paid", "data": {"invoice_id": "i"}}, "occurred_at"),
        ({**_canonical(), "occurred_at": "yesterday"}, "RFC 3339"),
        ({**_canonical(), "data": "in_1"}, "'data' must be a JSON object"),
        (_canonical(amount_paid="12.00"), "'amount_paid' must be a non-negative integer"),
        (_canonical(amount_paid=-5), "non-negative"),
        (_canonical(status="settled"), "'status' 'settled' is not one of"),
        (_canonical("invoice.refunded"), "needs 'refund'"),
        (_canonical("invoice.refunded", refund={"id": "re_1"}), "'amount' is missing"),
        (_canonical("invoice.dispute_opened"), "needs 'dispute'"),
        (_canonical("invoice.payment_failed", attempt=0), "counts from 1"),
    ],
)
def test_canonical_json_missing_what_processing_needs(
    payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnprocessableEvent, match=message) as caught:
        parse_event("standard", payload)
    assert isinstance(caught.value, BillhookError)


def _stripe(kind: str, obj: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    return {
        "id": "evt_s1",
        "type": kind,
        "created": 1700000000,
        "data": {"object": obj},
        **envelope,
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_stripe("invoice.paid", {"status": "paid"}), "'id' is missing"),
        ({"id": "evt_s1", "type": "invoice.paid", "data": {"object": {"id": "in"}}}, "'created'"),
        ({"id": "evt_s1", "type": "invoice.paid", "created": 1}, "'data' must be"),
        (_stripe("refund.created", {"id": "re_1", "amount": 5}), "has no 'charge'"),
        (_stripe("refund.created", {"id": "re_1", "charge": "ch_1"}), "'amount' is missing"),
        (_stripe("charge.refunded", {"id": "ch_1"}), "neither 'refunds' nor 'amount_refunded'"),
        (_stripe("charge.dispute.created", {"id": "dp_1"}), "has no 'charge'"),
        (_stripe("invoice.paid", {"id": "in_1", "amount_paid": 1.5}), "non-negative integer"),
    ],
)
def test_stripe_events_missing_what_processing_needs(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(UnprocessableEvent, match=message):
        parse_event("stripe", payload)


def test_stripe_expanded_ids_and_new_api_refunds() -> None:
    invoice = parse_event(
        "stripe",
        _stripe("invoice.paid", {"id": "in_1", "charge": {"id": "ch_9", "object": "charge"}}),
    )
    assert invoice is not None and invoice.charge_link == ("ch_9", "in_1")
    # API 2022-11-15+: charge.refunded carries no refunds list, only the cumulative amount.
    cumulative = parse_event(
        "stripe",
        _stripe("charge.refunded", {"id": "ch_9", "amount_refunded": 300, "invoice": None}),
    )
    assert cumulative is not None
    assert (cumulative.refunds, cumulative.amount_refunded, cumulative.invoice_id) == (
        (),
        300,
        None,
    )


def test_unknown_source_is_refused() -> None:
    with pytest.raises(UnprocessableEvent, match="expected 'stripe' or 'standard'"):
        parse_event("paypal", {})
