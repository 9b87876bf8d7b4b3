"""One test per written policy of the invoice model (docs/billing.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from billhook.billing import (
    Applied,
    BillingEvent,
    EffectKind,
    InvoiceState,
    InvoiceStatus,
    Policy,
    UnprocessableEvent,
    apply,
    needs_attention,
    parse_event,
    summarize,
)

INVOICE = "in_pol"
_counter = iter(range(1_000_000))


def ev(kind: str, at: float = 1000.0, **data: Any) -> BillingEvent:
    event = parse_event(
        "standard",
        {
            "id": f"evt_{next(_counter)}",
            "type": kind,
            "occurred_at": at,
            "data": {"invoice_id": INVOICE, "currency": "usd", **data},
        },
    )
    assert event is not None
    return event


def paid(at: float = 1000.0, amount: int = 1000) -> BillingEvent:
    return ev("invoice.paid", at, status="paid", amount_due=amount, amount_paid=amount)


def refund(
    refund_id: str, amount: int, at: float = 1000.0, status: str = "succeeded"
) -> BillingEvent:
    return ev("invoice.refunded", at, refund={"id": refund_id, "amount": amount, "status": status})


def play(
    events: Iterable[BillingEvent], policy: Policy = Policy()
) -> tuple[InvoiceState, list[Applied]]:
    state: InvoiceState | None = None
    steps = []
    for event in events:
        applied = apply(state, event, policy)
        state = applied.state
        steps.append(applied)
    assert state is not None
    return state, steps


def keys(steps: list[Applied]) -> list[str]:
    return [e.idempotency_key for step in steps for e in step.effects]


def test_refund_before_payment_is_held_then_receipt_then_refund_notice() -> None:
    state, steps = play([refund("re_1", 400, at=900), paid(at=1000)])
    held = steps[0]
    assert held.effects == ()
    assert held.state.status is None and held.state.amount_refunded == 0
    assert summarize(held.state)["held_refunds"] == [
        {"refund_id": "re_1", "amount": 400, "held_since": 900.0}
    ]
    assert [c.reason.split(": ", 1)[1] for c in held.changes] == [
        "refund re_1 of 400 held: invoice not yet paid"
    ]
    released = steps[1]
    assert [e.kind for e in released.effects] == [
        EffectKind.PAYMENT_RECEIPT,
        EffectKind.REFUND_NOTICE,
    ]
    assert released.effects[1].payload == {
        "invoice_id": INVOICE,
        "number": None,
        "currency": "usd",
        "customer_email": None,
        "amount": 400,
        "refund_id": "re_1",
    }
    assert any("released (invoice now paid)" in c.reason for c in released.changes)
    assert state.status is InvoiceStatus.PARTIALLY_REFUNDED
    assert (state.amount_paid, state.amount_refunded, state.held_refunds) == (1000, 400, ())


def test_a_held_refund_whose_payment_never_comes_is_flagged_after_the_alert_delay() -> None:
    state, _ = play([ev("invoice.finalized", 500, status="open"), refund("re_1", 100, at=1000)])
    assert needs_attention(state, now=1000 + 3599, held_refund_alert_seconds=3600) is None
    reason = needs_attention(state, now=1000 + 7200, held_refund_alert_seconds=3600)
    assert reason is not None and "re_1 held for 2.0 h" in reason
    state = apply(state, paid(at=1001)).state
    assert needs_attention(state, now=10**9, held_refund_alert_seconds=3600) is None


def test_payment_failed_after_paid_changes_only_the_attempts_record() -> None:
    before, _ = play([ev("invoice.finalized", 1), paid(at=2)])
    late = apply(before, ev("invoice.payment_failed", 3, attempt=1, status="open"))
    assert late.effects == ()
    assert late.state.status is InvoiceStatus.PAID
    assert summarize(late.state)["failed_attempts"] == [1]
    assert [c.reason.split(": ", 1)[1] for c in late.changes] == [
        "payment attempt 1 failed (invoice already settled: recorded only)"
    ]
    # The switchable policy: send it anyway.
    loud = apply(
        before, ev("invoice.payment_failed", 3, attempt=1), Policy(late_failure_notices=True)
    )
    assert [e.idempotency_key for e in loud.effects] == [f"payment_failed_notice:{INVOICE}:1"]
    assert loud.state == late.state


def test_each_failed_attempt_is_noticed_once() -> None:
    failures = [ev("invoice.payment_failed", n, attempt=n, amount_due=700) for n in (1, 2, 2, 1, 3)]
    state, steps = play(failures)
    assert keys(steps) == [f"payment_failed_notice:{INVOICE}:{n}" for n in (1, 2, 3)]
    assert steps[0].effects[0].payload["attempt"] == 1
    assert steps[0].effects[0].payload["amount"] == 700
    assert state.status is InvoiceStatus.OPEN


def test_a_sender_that_does_not_number_attempts_gets_one_notice() -> None:
    _, steps = play([ev("invoice.payment_failed", 1), ev("invoice.payment_failed", 2)])
    assert keys(steps) == [f"payment_failed_notice:{INVOICE}:1"]


@pytest.mark.parametrize("void_first", [True, False])
def test_void_and_paid_both_reported_the_payment_wins(void_first: bool) -> None:
    events = [ev("invoice.voided", 5, status="void"), paid(at=6)]
    state, steps = play(events if void_first else events[::-1])
    assert state.status is InvoiceStatus.PAID
    assert keys(steps) == [f"payment_receipt:{INVOICE}"]
    assert state.anomalies
    reason = needs_attention(state, now=0, held_refund_alert_seconds=1)
    assert reason is not None and "payment wins" in reason


def test_uncollectible_then_paid_is_paid_with_a_receipt() -> None:
    _state, steps = play(
        [ev("invoice.finalized", 1), ev("invoice.marked_uncollectible", 2), paid(at=3)]
    )
    assert [s.state.status for s in steps] == [
        InvoiceStatus.OPEN,
        InvoiceStatus.UNCOLLECTIBLE,
        InvoiceStatus.PAID,
    ]
    assert keys(steps) == [f"payment_receipt:{INVOICE}"]
    assert steps[2].changes[0].reason.endswith("uncollectible → paid")


def test_uncollectible_then_void_is_void_in_either_order() -> None:
    for order in ((2, 3), (3, 2)):
        state, _ = play(
            [ev("invoice.marked_uncollectible", order[0]), ev("invoice.voided", order[1])]
        )
        assert state.status is InvoiceStatus.VOID


def test_paid_never_returns_to_open() -> None:
    _state, steps = play(
        [paid(at=5), ev("invoice.finalized", 9, status="open"), ev("invoice.created", 10)]
    )
    assert [s.state.status for s in steps] == [InvoiceStatus.PAID] * 3
    assert steps[1].changes == () and steps[2].changes == ()


def test_dispute_flag_is_open_until_every_dispute_closes_closed_wins() -> None:
    opened = ev("invoice.dispute_opened", 1, dispute={"id": "dp_1", "status": "needs_response"})
    closed = ev("invoice.dispute_closed", 2, dispute={"id": "dp_1", "status": "lost"})
    other = ev("invoice.dispute_opened", 3, dispute={"id": "dp_2"})
    assert play([paid(), opened])[0].disputed
    assert not play([paid(), opened, closed])[0].disputed
    assert not play([closed, opened])[0].disputed  # the close arrived first: closed wins
    assert play([opened, closed, other])[0].disputed
    state, steps = play([paid(), opened, closed])
    assert state.status is InvoiceStatus.PAID  # a lost dispute is not a refund
    assert keys(steps) == [f"payment_receipt:{INVOICE}"]
    assert summarize(state)["disputes"] == [
        {"dispute_id": "dp_1", "status": "lost", "closed": True}
    ]


def test_a_refund_is_noticed_once_whatever_its_status_updates() -> None:
    state, steps = play([paid(), refund("re_1", 300, status="pending"), refund("re_1", 300)])
    assert keys(steps) == [f"payment_receipt:{INVOICE}", f"refund_notice:{INVOICE}:re_1"]
    assert state.refunds["re_1"].status == "succeeded"
    assert state.amount_refunded == 300


def test_a_refund_that_fails_stops_counting_and_its_notice_is_not_recalled() -> None:
    state, steps = play([paid(), refund("re_1", 1000), refund("re_1", 1000, status="failed")])
    assert keys(steps) == [f"payment_receipt:{INVOICE}", f"refund_notice:{INVOICE}:re_1"]
    assert state.status is InvoiceStatus.PAID and state.amount_refunded == 0
    assert "refund re_1 is failed: not counted" in steps[2].changes[-1].reason
    # Known failed first: never counted, never noticed.
    state, steps = play([refund("re_1", 1000, status="failed"), paid(), refund("re_1", 1000)])
    assert keys(steps) == [f"payment_receipt:{INVOICE}"]
    assert state.amount_refunded == 0


def test_cumulative_amount_without_a_refund_list_counts_but_notices_wait_for_the_id() -> None:
    cumulative = parse_event(
        "stripe",
        {
            "id": "evt_cr",
            "type": "charge.refunded",
            "created": 5,
            "data": {"object": {"id": "ch_1", "invoice": INVOICE, "amount_refunded": 1000}},
        },
    )
    assert cumulative is not None
    state, steps = play([paid(), cumulative])
    assert state.status is InvoiceStatus.REFUNDED
    assert keys(steps) == [f"payment_receipt:{INVOICE}"]
    state = apply(state, refund("re_1", 1000, at=5)).state
    assert state.amount_refunded == 1000


def test_paid_without_an_amount_means_paid_in_full() -> None:
    state, steps = play([ev("invoice.finalized", 1, amount_due=2500), ev("invoice.paid", 2)])
    assert state.amount_paid == 2500
    assert steps[1].effects[0].payload["amount"] == 2500


def test_snapshot_fields_come_from_the_most_advanced_snapshot_not_the_last_arrival() -> None:
    draft = ev("invoice.created", 10, status="draft", customer_email="old@example.com")
    final = ev("invoice.paid", 10, status="paid", number="N-1", customer_email="new@example.com")
    for order in ([draft, final], [final, draft]):
        state, _ = play(order)
        assert (state.customer_email, state.number) == ("new@example.com", "N-1")


def test_state_round_trips_through_json_and_refuses_an_unknown_version() -> None:
    state, _ = play(
        [
            refund("re_1", 10),
            paid(),
            ev("invoice.payment_failed", 1, attempt=2),
            ev("invoice.dispute_opened", 3, dispute={"id": "dp_1"}),
        ]
    )
    stored = orjson.loads(orjson.dumps(state.to_dict()))
    assert InvoiceState.from_dict(stored) == state
    assert summarize(InvoiceState.from_dict(stored)) == summarize(state)
    with pytest.raises(ValueError, match="upgrade"):
        InvoiceState.from_dict({**stored, "version": 99})
    with pytest.raises(ValueError, match="shape"):
        InvoiceState.from_dict({"version": 1, "invoice_id": "x"})


def test_summary_has_the_contract_fields() -> None:
    state, _ = play([ev("invoice.paid", 1, amount_paid=900, customer_email="p@example.com")])
    summary = summarize(state)
    assert {
        k: summary[k]
        for k in ("id", "status", "currency", "amount_due", "amount_paid", "amount_refunded")
    } == {
        "id": INVOICE,
        "status": "paid",
        "currency": "usd",
        "amount_due": 0,
        "amount_paid": 900,
        "amount_refunded": 0,
    }
    assert (summary["customer_email"], summary["disputed"], summary["held_refunds"]) == (
        "p@example.com",
        False,
        [],
    )


def test_an_event_for_another_invoice_or_no_invoice_is_refused() -> None:
    state, _ = play([paid()])
    other = paid().with_invoice("in_other")
    with pytest.raises(ValueError, match="cannot join"):
        apply(state, other)
    stripe_refund = parse_event(
        "stripe",
        {
            "id": "evt_r",
            "type": "refund.created",
            "created": 1,
            "data": {"object": {"id": "re_1", "amount": 1, "charge": "ch_1"}},
        },
    )
    assert stripe_refund is not None
    with pytest.raises(UnprocessableEvent, match="resolve it through charge_links"):
        apply(state, stripe_refund)
