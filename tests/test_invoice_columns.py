"""The invoice row's query columns say what the model's summary says.

`summary_columns` reads the state's view directly rather than building the whole summary
(refund and dispute lists included) on every write; the columns the API, `explain` and queries
read must still be exactly the summary's fields, for every state a delivery order goes through.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from billhook.billing import InvoiceState, apply, summarize
from billhook.store.invoices import summary_columns
from test_billing_properties import deliveries


def from_summary(state: InvoiceState) -> dict[str, Any]:
    summary = summarize(state)
    return {
        "number": summary["number"],
        "status": summary["status"],
        "disputed": bool(summary["disputed"]),
        "currency": summary["currency"],
        "amount_due": summary["amount_due"] or 0,
        "amount_paid": summary["amount_paid"] or 0,
        "amount_refunded": summary["amount_refunded"] or 0,
        "customer_email": summary["customer_email"],
    }


@given(delivery=deliveries())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_the_columns_are_the_summarys_fields_in_every_state(delivery: Any) -> None:
    _history, order = delivery
    state: InvoiceState | None = None
    for event in order:
        state = apply(state, event).state
        columns = summary_columns(state)
        assert columns == from_summary(state)
        assert [type(v) for v in columns.values()] == [
            type(v) for v in from_summary(state).values()
        ]
