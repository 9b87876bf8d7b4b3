"""The checker passes a perfect receiver and fails each kind of bad observation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from billhook.sim.checker import (
    DeliveryStats,
    Observation,
    ObservedEmail,
    check,
    converged,
)
from billhook.sim.classify import classify_email
from billhook.sim.histories import RECEIPT, REFUND_NOTICE, History, generate_histories


def _perfect(histories: Sequence[History]) -> Observation:
    event_ids = frozenset(e.event_id for h in histories for e in h.events)
    invoices = {
        h.invoice_id: {
            "id": h.invoice_id,
            "status": h.truth.status,
            "currency": h.truth.currency,
            "amount_due": h.truth.amount_due,
            "amount_paid": h.truth.amount_paid,
            "amount_refunded": h.truth.amount_refunded,
            "disputed": h.truth.disputed,
        }
        for h in histories
    }
    emails = [
        ObservedEmail(
            f"<{e.kind}.{e.invoice_id}.{e.ref}@billhook>",
            e.kind,
            e.invoice_id,
            e.ref,
            f"{e.kind} {e.invoice_id}",
        )
        for h in histories
        for e in h.effects
    ]
    return Observation(
        deliveries=DeliveryStats(
            len(event_ids), len(event_ids), {"200": len(event_ids)}, event_ids
        ),
        invoices=invoices,
        emails=emails,
        stored_event_ids=event_ids,
    )


HISTORIES = generate_histories(3, 60)


def _with_refund() -> History:
    return next(h for h in HISTORIES if h.truth.refund_ids)


def test_a_perfect_receiver_passes() -> None:
    observed = _perfect(HISTORIES)
    report = check(HISTORIES, observed)
    assert report.ok, report.violations
    assert converged(HISTORIES, observed)
    assert report.acked_not_stored == 0 and report.wrong_states == 0


def test_a_duplicate_email_under_a_new_message_id_is_a_violation() -> None:
    observed = _perfect(HISTORIES)
    first = next(e for e in observed.emails if e.kind == RECEIPT)
    again = dataclasses.replace(first, message_id="<another@naive>")
    report = check(HISTORIES, dataclasses.replace(observed, emails=[*observed.emails, again]))
    assert not report.ok and report.duplicate_effects == 1


def test_a_resend_under_the_same_message_id_is_reported_not_failed() -> None:
    observed = _perfect(HISTORIES)
    first = observed.emails[0]
    report = check(HISTORIES, dataclasses.replace(observed, emails=[*observed.emails, first]))
    assert report.ok and report.resends == 1


def test_emails_without_message_id_count_as_different_keys() -> None:
    observed = _perfect(HISTORIES)
    first = dataclasses.replace(observed.emails[0], message_id=None)
    emails = [first, first, *observed.emails[1:]]
    report = check(HISTORIES, dataclasses.replace(observed, emails=emails))
    assert report.duplicate_effects == 1


def test_a_missing_refund_notice_is_a_violation() -> None:
    observed = _perfect(HISTORIES)
    refund = _with_refund().truth.refund_ids[0]
    emails = [e for e in observed.emails if e.ref != refund]
    report = check(HISTORIES, dataclasses.replace(observed, emails=emails))
    assert report.missing_effects == 1 and not report.ok
    assert not converged(HISTORIES, dataclasses.replace(observed, emails=emails))


def test_a_wrong_state_and_a_missing_invoice_are_violations() -> None:
    observed = _perfect(HISTORIES)
    history = _with_refund()
    invoices = dict(observed.invoices)
    invoices[history.invoice_id] = {
        **invoices[history.invoice_id],
        "status": "paid",
        "amount_refunded": 0,
    }
    other = next(h for h in HISTORIES if h is not history)
    invoices[other.invoice_id] = None
    report = check(HISTORIES, dataclasses.replace(observed, invoices=invoices))
    assert report.wrong_states == 2 and not report.ok


def test_an_acknowledged_event_that_is_not_stored_is_a_violation() -> None:
    observed = _perfect(HISTORIES)
    stored = set(observed.stored_event_ids or ())
    stored.discard(HISTORIES[0].events[0].event_id)
    report = check(HISTORIES, dataclasses.replace(observed, stored_event_ids=frozenset(stored)))
    assert report.acked_not_stored == 1 and not report.ok


def test_an_event_never_acknowledged_and_an_unexpected_email_are_violations() -> None:
    observed = _perfect(HISTORIES)
    acked = set(observed.deliveries.acked_event_ids)
    acked.discard(HISTORIES[1].events[-1].event_id)
    deliveries = dataclasses.replace(observed.deliveries, acked_event_ids=frozenset(acked))
    stray = ObservedEmail("<x@y>", REFUND_NOTICE, HISTORIES[0].invoice_id, "re_nope", "refund")
    report = check(
        HISTORIES,
        dataclasses.replace(observed, deliveries=deliveries, emails=[*observed.emails, stray]),
    )
    assert report.never_acknowledged == 1 and report.unexpected_effects == 1


def test_an_undisclosed_field_is_not_judged() -> None:
    observed = _perfect(HISTORIES)
    invoices = {
        k: {f: v for f, v in (s or {}).items() if f != "disputed"}
        for k, s in observed.invoices.items()
    }
    assert check(HISTORIES, dataclasses.replace(observed, invoices=invoices)).ok


def test_classify_reads_headers_first_then_the_subject() -> None:
    by_header = classify_email(
        {
            "X-Billhook-Effect": "refund_notice",
            "X-Billhook-Invoice": "in_1",
            "X-Billhook-Ref": "re_9",
        },
        "whatever",
    )
    assert by_header is not None and by_header.key == (REFUND_NOTICE, "in_1", "re_9")
    by_subject = classify_email({}, "Refund re_abc for invoice in_xyz")
    assert by_subject is not None and by_subject.key == (REFUND_NOTICE, "in_xyz", "re_abc")
    failed = classify_email({}, "Payment failed for invoice in_q (attempt 2)")
    assert failed is not None and failed.key == ("payment_failed", "in_q", "2")
    receipt = classify_email({}, "Receipt for invoice in_q")
    assert receipt is not None and receipt.key == (RECEIPT, "in_q", "")
    assert classify_email({}, "hello") is None
    keyed = classify_email(
        {"X-Billhook-Idempotency-Key": "payment_failed_notice:in_z:3"}, "Payment of $1 failed"
    )
    assert keyed is not None and keyed.key == ("payment_failed", "in_z", "3")
