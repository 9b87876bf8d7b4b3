"""billhook's canonical JSON (the Standard Webhooks source) -> canonical billing events.

{"id": str, "type": str, "occurred_at": RFC 3339 string or epoch seconds,
 "data": {"invoice_id": str, "number"?, "status"?, "currency"?, "amount_due"?, "amount_paid"?,
          "amount_refunded"?, "customer_email"?, "charge_id"?, "attempt"?,
          "refund"?: {"id", "amount", "status"?}, "dispute"?: {"id", "status"?}}}
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from billhook.billing._fields import obj, opt_int, opt_obj, opt_str, req_int, req_str
from billhook.billing.events import (
    DISPUTE_CLOSED_STATUSES,
    BillingEvent,
    Dispute,
    EventKind,
    Refund,
)
from billhook.errors import UnprocessableEvent

SOURCE = "standard"
_KINDS = {kind.value: kind for kind in EventKind if kind is not EventKind.CHARGE_LINKED}
_STATUSES = frozenset(
    {"draft", "open", "paid", "partially_refunded", "refunded", "void", "uncollectible"}
)


def parse(payload: Mapping[str, Any]) -> BillingEvent | None:
    raw_type = payload.get("type")
    if not isinstance(raw_type, str) or raw_type not in _KINDS:
        return None
    kind = _KINDS[raw_type]
    event_id = req_str(payload, "id", f"canonical {raw_type}")
    where = f"canonical {raw_type} {event_id}"
    occurred_at = _time(payload.get("occurred_at"), where)
    data = obj(payload, "data", where)
    where += " data"
    status = opt_str(data, "status", where)
    if status is not None and status not in _STATUSES:
        raise UnprocessableEvent(
            f"{where}: 'status' {status!r} is not one of {', '.join(sorted(_STATUSES))}"
        )
    refunds: tuple[Refund, ...] = ()
    refund = opt_obj(data, "refund", where)
    if refund is not None:
        refunds = (
            Refund(
                refund_id=req_str(refund, "id", where + ".refund"),
                amount=req_int(refund, "amount", where + ".refund"),
                status=opt_str(refund, "status", where + ".refund") or "succeeded",
            ),
        )
    amount_refunded = opt_int(data, "amount_refunded", where)
    if kind is EventKind.REFUNDED and not refunds:
        raise UnprocessableEvent(f"{where}: invoice.refunded needs 'refund': {{id, amount}}")
    attempt = opt_int(data, "attempt", where)
    if attempt == 0:
        raise UnprocessableEvent(f"{where}: 'attempt' counts from 1")
    return BillingEvent(
        source=SOURCE,
        event_id=event_id,
        type=kind,
        raw_type=raw_type,
        occurred_at=occurred_at,
        invoice_id=req_str(data, "invoice_id", where),
        charge_id=opt_str(data, "charge_id", where),
        status=status,
        number=opt_str(data, "number", where),
        currency=opt_str(data, "currency", where),
        customer_email=opt_str(data, "customer_email", where),
        amount_due=opt_int(data, "amount_due", where),
        amount_paid=opt_int(data, "amount_paid", where),
        amount_refunded=amount_refunded,
        attempt=attempt if kind is EventKind.PAYMENT_FAILED else None,
        refunds=refunds,
        dispute=_dispute(data, kind, where),
    )


def _dispute(data: Mapping[str, Any], kind: EventKind, where: str) -> Dispute | None:
    dispute = opt_obj(data, "dispute", where)
    if kind not in (EventKind.DISPUTE_OPENED, EventKind.DISPUTE_CLOSED):
        return None
    if dispute is None:
        raise UnprocessableEvent(f"{where}: {kind.value} needs 'dispute': {{id, status}}")
    closing = kind is EventKind.DISPUTE_CLOSED
    status = opt_str(dispute, "status", where + ".dispute") or (
        "closed" if closing else "needs_response"
    )
    return Dispute(
        dispute_id=req_str(dispute, "id", where + ".dispute"),
        status=status,
        closed=closing or status in DISPUTE_CLOSED_STATUSES,
    )


def _time(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise UnprocessableEvent(
        f"{where}: 'occurred_at' must be RFC 3339 (e.g. 2024-05-01T12:00:00Z) or epoch seconds, "
        f"got {value!r}"
    )
