"""The generator only produces histories Stripe could produce, and its truth follows from them."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from billhook.sim.histories import (
    PAID_STATUSES,
    PAYMENT_FAILED,
    RECEIPT,
    REFUND_NOTICE,
    History,
    generate_histories,
)


def _invoice_snapshots(history: History) -> list[dict]:
    return [e.body["data"]["object"] for e in history.events if e.type.startswith("invoice.")]


def _assert_valid(history: History) -> None:
    truth = history.truth
    events = history.events
    assert events[0].type == "invoice.created"
    created = [e.created for e in events]
    assert created == sorted(created), "provider time never goes backwards"
    paid_at = None
    refunded_so_far = 0
    seen_refunds: set[str] = set()
    for event in events:
        body = orjson.loads(orjson.dumps(event.body))  # JSON-serialisable as sent
        assert body["id"] == event.event_id and body["type"] == event.type
        obj = body["data"]["object"]
        if obj["object"] == "invoice":
            assert obj["id"] == history.invoice_id
            transitions = obj["status_transitions"]
            if obj["status"] == "void":
                assert transitions["paid_at"] is None, "a void only before payment"
            if obj["status"] == "paid":
                assert transitions["paid_at"] is not None
                assert obj["amount_paid"] == obj["amount_due"]
                paid_at = transitions["paid_at"]
            if event.type == "invoice.payment_failed":
                assert paid_at is None, "failures only before payment"
        elif obj["object"] == "charge":
            assert paid_at is not None, "charge events only after payment"
            assert obj["invoice"] == history.invoice_id
            assert obj["amount_refunded"] <= obj["amount"]
            assert obj["amount_refunded"] >= refunded_so_far, "refunds are cumulative"
            ids = {r["id"] for r in obj["refunds"]["data"]}
            assert seen_refunds <= ids, "a refund list never loses a refund"
            assert sum(r["amount"] for r in obj["refunds"]["data"]) == obj["amount_refunded"]
            refunded_so_far, seen_refunds = obj["amount_refunded"], ids
        elif obj["object"] in ("refund", "dispute"):
            assert paid_at is not None and obj["charge"] == truth.charge_id
    assert truth.amount_refunded == refunded_so_far <= truth.amount_paid
    assert set(truth.refund_ids) == seen_refunds
    if truth.status in PAID_STATUSES:
        assert truth.amount_paid == truth.amount_due > 0
    else:
        assert truth.amount_paid == 0 and not truth.refund_ids
    if truth.amount_refunded == 0 and truth.status in PAID_STATUSES:
        assert truth.status == "paid"
    last = _invoice_snapshots(history)[-1]
    expected_status = {"partially_refunded": "paid", "refunded": "paid"}.get(
        truth.status, truth.status
    )
    assert last["status"] == expected_status


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 5))
def test_every_generated_history_is_valid_for_stripe(seed: int, count: int) -> None:
    for history in generate_histories(seed, count):
        _assert_valid(history)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_expected_effects_follow_from_the_truth(seed: int) -> None:
    for history in generate_histories(seed, 3):
        truth = history.truth
        kinds = [e.kind for e in history.effects]
        assert kinds.count(RECEIPT) == (1 if truth.status in PAID_STATUSES else 0)
        refunds = [e.ref for e in history.effects if e.kind == REFUND_NOTICE]
        assert sorted(refunds) == sorted(truth.refund_ids)
        failed = [e for e in history.effects if e.kind == PAYMENT_FAILED]
        assert len(failed) == truth.failed_attempts
        assert all(e.required == (truth.status == "open") for e in failed)


def test_same_seed_same_histories_and_ids_are_unique() -> None:
    first = generate_histories(7, 30)
    assert first == generate_histories(7, 30)
    assert generate_histories(7, 30, namespace="other") != first
    event_ids = [e.event_id for h in first for e in h.events]
    assert len(event_ids) == len(set(event_ids))


def test_a_large_run_covers_every_shape() -> None:
    histories = generate_histories(1, 400)
    statuses = {h.truth.status for h in histories}
    assert statuses >= {
        "draft",
        "open",
        "paid",
        "partially_refunded",
        "refunded",
        "void",
        "uncollectible",
    }
    types = {e.type for h in histories for e in h.events}
    assert types >= {
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.voided",
        "invoice.marked_uncollectible",
        "charge.refunded",
        "charge.dispute.created",
        "charge.dispute.closed",
        "refund.created",
    }
    assert any(h.truth.disputed for h in histories)
    ties = [h for h in histories if len({e.created for e in h.events}) < len(h.events)]
    assert ties, "same-second events must occur"
