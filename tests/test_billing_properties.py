"""Hypothesis properties of the pure invoice model over generated, valid provider histories.

A history is generated as the provider lives it (a story of one invoice with its true end state),
rendered as the events the provider sends (Stripe envelopes or billhook's canonical JSON, each a
snapshot of the invoice when the event was built), parsed with `parse_event`, and resolved to the
invoice the way the shell does through charge_links (`with_invoice`). Then it is delivered in
order, in any permutation, with duplicates, and with every timestamp in the same second.

Examples: 300 per property by default (600 for the delivery-order property), which is what CI
runs (~3000 histories, each delivered several ways); HYPOTHESIS_PROFILE=long runs 10x more.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billhook.billing import (
    BillingEvent,
    EffectIntent,
    EffectKind,
    InvoiceState,
    InvoiceStatus,
    Policy,
    apply,
    parse_event,
    summarize,
)
from billhook.billing.invoice import lifecycle_rank

EXAMPLES = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 300
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INVOICE = "in_prop"
CHARGE = "ch_prop"
LATE = Policy(late_failure_notices=True)


@dataclass
class Truth:
    """The provider's own view at the end of the story."""

    status: str = "draft"
    amount_due: int = 0
    amount_paid: int = 0
    refunds: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    disputed: bool = False


@dataclass
class History:
    source: str
    events: list[BillingEvent]
    truth: Truth


@dataclass
class _Story:
    """Mutable provider state while the story is drawn; `emit` renders a snapshot of it."""

    source: str
    t: int
    currency: str
    email: str
    number: str
    truth: Truth
    transitions: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(
            ("finalized_at", "paid_at", "voided_at", "marked_uncollectible_at")
        )
    )
    refund_list: list[dict[str, Any]] = field(default_factory=list)
    events: list[BillingEvent] = field(default_factory=list)

    def parse(self, payload: dict[str, Any]) -> None:
        event = parse_event(self.source, payload)
        assert event is not None, payload
        if event.invoice_id is None:  # the shell resolves the charge through charge_links
            assert event.charge_id == CHARGE
            event = event.with_invoice(INVOICE)
        self.events.append(event)

    def _envelope(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"evt_{len(self.events)}",
            "object": "event",
            "type": kind,
            "created": self.t,
            "data": {"object": obj},
        }

    def invoice(self, kind: str, status: str | None = None) -> None:
        truth = self.truth
        snapshot_status = status or truth.status
        if self.source == "stripe":
            self.parse(
                self._envelope(
                    kind,
                    {
                        "id": INVOICE,
                        "object": "invoice",
                        "status": snapshot_status,
                        "amount_due": truth.amount_due,
                        "amount_paid": truth.amount_paid,
                        "attempt_count": truth.attempts,
                        "charge": CHARGE if truth.attempts else None,
                        "currency": self.currency,
                        "customer_email": self.email,
                        "number": None if snapshot_status == "draft" else self.number,
                        "status_transitions": dict(self.transitions),
                    },
                )
            )
            return
        kind = {"invoice.payment_succeeded": "invoice.paid"}.get(kind, kind)
        data: dict[str, Any] = {
            "invoice_id": INVOICE,
            "status": snapshot_status,
            "amount_due": truth.amount_due,
            "currency": self.currency,
            "customer_email": self.email,
        }
        if snapshot_status != "draft":
            data["number"] = self.number
        if snapshot_status == "paid":
            data["amount_paid"] = truth.amount_paid
        if kind == "invoice.payment_failed":
            data["attempt"] = truth.attempts
        self.parse(self._standard(kind, data))

    def _standard(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        # Canonical JSON allows RFC 3339 or epoch seconds: use both.
        when: Any = self.t
        if len(self.events) % 2:
            when = datetime.fromtimestamp(self.t, UTC).isoformat().replace("+00:00", "Z")
        return {"id": f"evt_{len(self.events)}", "type": kind, "occurred_at": when, "data": data}

    def refund(self, refund_id: str, amount: int, status: str, draw: Any) -> None:
        entry = {
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "charge": CHARGE,
            "currency": self.currency,
            "status": status,
        }
        listing = [e for e in self.refund_list if e["id"] != refund_id]
        self.refund_list = [entry, *listing]  # Stripe lists newest first
        if self.source == "standard":
            data: dict[str, Any] = {
                "invoice_id": INVOICE,
                "refund": {"id": refund_id, "amount": amount, "status": status},
            }
            if draw(st.booleans()):
                data["amount_refunded"] = self._refunded_total()
            self.parse(self._standard("invoice.refunded", data))
            return
        expanded = draw(st.booleans())
        charge: dict[str, Any] = {
            "id": CHARGE,
            "object": "charge",
            "amount": self.truth.amount_paid,
            "amount_refunded": self._refunded_total(),
            "currency": self.currency,
            "invoice": INVOICE if draw(st.booleans()) else None,
        }
        if expanded:
            charge["refunds"] = {"object": "list", "data": [dict(e) for e in self.refund_list]}
        self.parse(self._envelope("charge.refunded", charge))
        # Without the expanded list, the refund's own event is the only one naming it.
        if not expanded or draw(st.booleans()):
            kind = draw(
                st.sampled_from(["refund.created", "refund.updated", "charge.refund.updated"])
            )
            self.parse(self._envelope(kind, entry))

    def _refunded_total(self) -> int:
        return sum(e["amount"] for e in self.refund_list if e["status"] in ("pending", "succeeded"))

    def dispute(self, kind: str, dispute_id: str, status: str) -> None:
        if self.source == "stripe":
            obj = {"id": dispute_id, "object": "dispute", "charge": CHARGE, "status": status}
            self.parse(self._envelope(kind, obj))
            return
        canonical = {
            "charge.dispute.created": "invoice.dispute_opened",
            "charge.dispute.closed": "invoice.dispute_closed",
        }[kind]
        data = {"invoice_id": INVOICE, "dispute": {"id": dispute_id, "status": status}}
        self.parse(self._standard(canonical, data))


@st.composite
def histories(draw: Any, *, ties_only: bool = False) -> History:
    source = draw(st.sampled_from(["stripe", "standard"]))
    amount_due = draw(st.integers(1, 50_000))
    story = _Story(
        source=source,
        t=1_700_000_000,
        currency=draw(st.sampled_from(["usd", "eur", "jpy"])),
        email="payer@example.com",
        number="ABC-0001",
        truth=Truth(amount_due=amount_due),
    )
    truth = story.truth

    def tick() -> None:
        if not ties_only:
            story.t += draw(st.sampled_from([0, 0, 0, 1, 2, 60]))

    story.invoice("invoice.created")
    if draw(st.booleans()):
        tick()
        story.invoice("invoice.updated")
    if draw(st.integers(0, 19)) == 0:
        return History(source, story.events, truth)  # a draft nobody finalized
    tick()
    truth.status, story.transitions["finalized_at"] = "open", story.t

    def pay() -> None:
        truth.status, truth.amount_paid = "paid", truth.amount_due
        truth.attempts += 1
        story.transitions["paid_at"] = story.t
        pair = ["invoice.paid", "invoice.payment_succeeded"]
        for kind in draw(st.permutations(pair)) if source == "stripe" else pair[:1]:
            story.invoice(kind)
        if source == "stripe" and draw(st.booleans()):
            story.parse(
                story._envelope(
                    "charge.succeeded",
                    {"id": CHARGE, "object": "charge", "invoice": INVOICE, "currency": "usd"},
                )
            )

    if draw(st.integers(0, 3)) == 0:
        # One API call finalizes and pays: one second, and the finalized snapshot already
        # shows the invoice paid (SOURCES.md, same-second burst).
        truth.status, truth.amount_paid = "paid", amount_due
        truth.attempts += 1
        story.transitions["paid_at"] = story.t
        story.invoice("invoice.finalized")
        pay_again = truth.attempts
        truth.attempts -= 1
        truth.status = "open"
        pay()
        assert truth.attempts == pay_again
    else:
        story.invoice("invoice.finalized")
        for _ in range(draw(st.integers(0, 3))):
            tick()
            truth.attempts += 1
            story.invoice("invoice.payment_failed")
        tick()
        ending = draw(st.sampled_from(["paid", "paid", "paid", "void", "uncollectible", "open"]))
        if ending == "paid":
            pay()
        elif ending == "void":
            truth.status, story.transitions["voided_at"] = "void", story.t
            story.invoice("invoice.voided")
        elif ending == "uncollectible":
            truth.status, story.transitions["marked_uncollectible_at"] = "uncollectible", story.t
            story.invoice("invoice.marked_uncollectible")
            later = draw(st.sampled_from(["stay", "paid", "void"]))
            tick()
            if later == "paid":  # Stripe lets an uncollectible invoice be paid
                pay()
            elif later == "void":
                truth.status, story.transitions["voided_at"] = "void", story.t
                story.invoice("invoice.voided")

    if truth.status == "paid":
        for index in range(draw(st.integers(0, 3))):
            remaining = truth.amount_paid - sum(truth.refunds.values())
            if remaining <= 0:
                break
            tick()
            amount = draw(st.integers(1, remaining))
            refund_id = f"re_{index}"
            if draw(st.integers(0, 3)) == 0:
                story.refund(refund_id, amount, "pending", draw)
                tick()
            truth.refunds[refund_id] = amount
            story.refund(refund_id, amount, "succeeded", draw)
        if draw(st.integers(0, 3)) == 0:
            tick()
            story.dispute("charge.dispute.created", "dp_1", "needs_response")
            truth.disputed = True
            if draw(st.booleans()):
                tick()
                story.dispute(
                    "charge.dispute.closed", "dp_1", draw(st.sampled_from(["won", "lost"]))
                )
                truth.disputed = False
    return History(source, story.events, truth)


@st.composite
def deliveries(draw: Any, *, ties_only: bool = False) -> tuple[History, list[BillingEvent]]:
    """A history and one way the provider might deliver it: permuted, with duplicates."""
    history = draw(histories(ties_only=ties_only))
    order = list(draw(st.permutations(history.events)))
    for duplicate in draw(st.lists(st.sampled_from(history.events), max_size=6)):
        order.insert(draw(st.integers(0, len(order))), duplicate)
    return history, order


@dataclass
class Run:
    states: list[InvoiceState]
    effects: list[EffectIntent]

    @property
    def final(self) -> InvoiceState:
        return self.states[-1]

    def keys(self, *kinds: EffectKind) -> list[str]:
        return [e.idempotency_key for e in self.effects if not kinds or e.kind in kinds]


def run(events: Sequence[BillingEvent], policy: Policy = Policy(), *, stored: bool = True) -> Run:
    state: InvoiceState | None = None
    states: list[InvoiceState] = []
    effects: list[EffectIntent] = []
    for event in events:
        applied = apply(state, event, policy)
        state = applied.state
        if stored:  # the shell stores the state as JSON between events: go through that
            state = InvoiceState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
            assert state == applied.state
        states.append(state)
        effects.extend(applied.effects)
    return Run(states, effects)


STABLE = (EffectKind.PAYMENT_RECEIPT, EffectKind.REFUND_NOTICE)


def expected_keys(truth: Truth) -> set[str]:
    keys = {f"payment_failed_notice:{INVOICE}:{n}" for n in range(1, truth.attempts + 1)}
    if truth.status == "paid":
        keys.discard(f"payment_failed_notice:{INVOICE}:{truth.attempts}")  # the paying attempt
        keys.add(f"payment_receipt:{INVOICE}")
        keys |= {f"refund_notice:{INVOICE}:{r}" for r in truth.refunds}
    return keys


def expected_status(truth: Truth) -> InvoiceStatus:
    refunded = sum(truth.refunds.values())
    if truth.status == "paid" and refunded:
        if refunded >= truth.amount_paid:
            return InvoiceStatus.REFUNDED
        return InvoiceStatus.PARTIALLY_REFUNDED
    return InvoiceStatus(truth.status)


@PROPERTY
@given(histories())
def test_in_order_history_ends_in_the_providers_state_with_each_effect_once(
    history: History,
) -> None:
    result = run(history.events)
    truth, final = history.truth, result.final
    assert final.status == expected_status(truth)
    assert final.amount_due == truth.amount_due
    assert final.amount_paid == truth.amount_paid
    assert final.amount_refunded == sum(truth.refunds.values())
    assert final.disputed == truth.disputed
    assert final.held_refunds == ()
    keys = result.keys()
    assert len(keys) == len(set(keys)), "an effect key was emitted twice"
    assert set(keys) == expected_keys(truth)


@dataclass
class Runs:
    """One history delivered in order and shuffled, under the default and the late policy."""

    in_order: Run
    shuffled: Run
    late_in_order: Run
    late_shuffled: Run


def check_convergence(runs: Runs) -> None:
    assert runs.shuffled.final.to_dict() == runs.in_order.final.to_dict()
    assert summarize(runs.shuffled.final) == summarize(runs.in_order.final)
    # The policy changes effects only, never the state.
    assert runs.late_shuffled.final.to_dict() == runs.in_order.final.to_dict()


def check_effects(runs: Runs) -> None:
    for result in (runs.in_order, runs.shuffled, runs.late_shuffled):
        keys = result.keys()
        assert len(keys) == len(set(keys)), "an effect key was emitted twice in one ordering"
    # Receipts and refund notices: exactly the same set.
    assert set(runs.shuffled.keys(*STABLE)) == set(runs.in_order.keys(*STABLE))
    # Payment-failed notices: a failure learned after settlement stays quiet (default policy)...
    failed = EffectKind.PAYMENT_FAILED_NOTICE
    assert set(runs.shuffled.keys(failed)) <= set(runs.in_order.keys(failed))
    # ...and with late notices on, the whole set is order independent.
    assert set(runs.late_shuffled.keys()) == set(runs.late_in_order.keys())


def check_never_backwards(runs: Runs) -> None:
    for result in (runs.in_order, runs.shuffled):
        statuses = [s.status for s in result.states]
        ranks = [lifecycle_rank(s) for s in statuses]
        assert ranks == sorted(ranks), statuses


def check_refunds_held_until_paid(runs: Runs) -> None:
    for state in runs.shuffled.states:
        if not state.is_paid:
            assert state.amount_refunded == 0
            assert state.status not in (
                InvoiceStatus.PARTIALLY_REFUNDED,
                InvoiceStatus.REFUNDED,
            )
        else:
            assert state.held_refunds == ()
    # Policy: the receipt always goes before any refund notice.
    kinds = [e.kind for e in runs.shuffled.effects if e.kind in STABLE]
    if EffectKind.REFUND_NOTICE in kinds:
        assert kinds[0] == EffectKind.PAYMENT_RECEIPT


# One generated delivery, four properties: generating histories costs more than checking them.
@settings(PROPERTY, max_examples=EXAMPLES * 2)
@given(deliveries())
def test_any_delivery_order_converges_emits_the_same_effects_and_never_regresses(
    delivery: tuple[History, list[BillingEvent]],
) -> None:
    history, order = delivery
    runs = Runs(
        in_order=run(history.events),
        shuffled=run(order),
        late_in_order=run(history.events, LATE, stored=False),
        late_shuffled=run(order, LATE, stored=False),
    )
    check_convergence(runs)
    check_effects(runs)
    check_never_backwards(runs)
    check_refunds_held_until_paid(runs)


@PROPERTY
@given(deliveries(ties_only=True))
def test_every_event_in_one_second_still_converges(
    delivery: tuple[History, list[BillingEvent]],
) -> None:
    history, order = delivery
    assert len({e.occurred_at for e in history.events}) == 1
    in_order, shuffled = run(history.events), run(order)
    assert in_order.final.status == expected_status(history.truth)
    assert shuffled.final.to_dict() == in_order.final.to_dict()
    assert set(shuffled.keys(*STABLE)) == set(in_order.keys(*STABLE))


@PROPERTY
@given(histories(), st.data())
def test_applying_an_event_again_changes_nothing_and_emits_nothing(
    history: History, data: st.DataObject
) -> None:
    prefix = data.draw(st.integers(1, len(history.events)))
    state = run(history.events[:prefix]).final
    event = data.draw(st.sampled_from(history.events[:prefix]))
    again = apply(state, event)
    assert again.state == state
    assert again.effects == ()
    assert again.changes == ()


@PROPERTY
@given(
    st.lists(st.integers(1, 5_000), min_size=1, max_size=6),
    st.data(),
)
def test_cumulative_refund_lists_arriving_out_of_order(
    amounts: list[int], data: st.DataObject
) -> None:
    """Each charge.refunded lists every refund so far; later lists may arrive first."""
    paid = sum(amounts) + data.draw(st.integers(0, 1))
    paid_event = parse_event(
        "stripe",
        {
            "id": "evt_paid",
            "type": "invoice.paid",
            "created": 1_700_000_000,
            "data": {"object": {"id": INVOICE, "status": "paid", "amount_paid": paid}},
        },
    )
    assert paid_event is not None
    snapshots: list[BillingEvent] = []
    listed: list[dict[str, Any]] = []
    for index, amount in enumerate(amounts):
        listed.insert(0, {"id": f"re_{index}", "amount": amount, "status": "succeeded"})
        event = parse_event(
            "stripe",
            {
                "id": f"evt_r{index}",
                "type": "charge.refunded",
                "created": 1_700_000_000 + data.draw(st.integers(0, 1)),
                "data": {
                    "object": {
                        "id": CHARGE,
                        "invoice": INVOICE,
                        "amount_refunded": sum(e["amount"] for e in listed),
                        "refunds": {"data": list(listed)},
                    }
                },
            },
        )
        assert event is not None
        snapshots.append(event)
    order = data.draw(st.permutations([paid_event, *snapshots]))
    result = run(order)
    assert result.final.amount_refunded == sum(amounts)
    expected = InvoiceStatus.REFUNDED if paid == sum(amounts) else InvoiceStatus.PARTIALLY_REFUNDED
    assert result.final.status == expected
    notices = result.keys(EffectKind.REFUND_NOTICE)
    assert sorted(notices) == sorted(f"refund_notice:{INVOICE}:re_{i}" for i in range(len(amounts)))
