"""Effect intents: what the invoice model asks the outbox to do, each under one idempotency key."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EffectKind(StrEnum):
    PAYMENT_RECEIPT = "payment_receipt"
    REFUND_NOTICE = "refund_notice"
    PAYMENT_FAILED_NOTICE = "payment_failed_notice"


@dataclass(frozen=True)
class EffectIntent:
    kind: EffectKind
    idempotency_key: str
    payload: dict[str, Any] = field(default_factory=dict)


def receipt_key(invoice_id: str) -> str:
    return f"{EffectKind.PAYMENT_RECEIPT}:{invoice_id}"


def refund_notice_key(invoice_id: str, refund_id: str) -> str:
    return f"{EffectKind.REFUND_NOTICE}:{invoice_id}:{refund_id}"


def payment_failed_key(invoice_id: str, attempt: int) -> str:
    return f"{EffectKind.PAYMENT_FAILED_NOTICE}:{invoice_id}:{attempt}"
