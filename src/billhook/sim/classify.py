"""Which effect an email is: the one place that reads dispatcher (or naive receiver) conventions.

Prefer what billhook's dispatcher sets: `X-Billhook-Idempotency-Key` (`kind:invoice[:ref]`, see
`billing/intents.py`), or explicit `X-Billhook-Effect` / `-Invoice` / `-Ref` headers; otherwise
read the subject, which names the invoice id by contract (the naive receiver's case).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from billhook.sim.histories import PAYMENT_FAILED, RECEIPT, REFUND_NOTICE

_INVOICE = re.compile(r"\b(in_[A-Za-z0-9]+)")
_REFUND = re.compile(r"\b(re_[A-Za-z0-9]+)")
_ATTEMPT = re.compile(r"attempt\s*#?\s*(\d+)", re.IGNORECASE)
_KIND_ALIASES = {
    "receipt": RECEIPT,
    "payment_receipt": RECEIPT,
    "refund": REFUND_NOTICE,
    "refund_notice": REFUND_NOTICE,
    "payment_failed": PAYMENT_FAILED,
    "payment_failed_notice": PAYMENT_FAILED,
}


@dataclass(frozen=True)
class EffectRef:
    kind: str
    invoice_id: str
    ref: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.invoice_id, self.ref)


def classify_email(headers: Mapping[str, str], subject: str, body: str = "") -> EffectRef | None:
    """The effect this email delivers, or None when it cannot be told."""
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    from_key = _from_idempotency_key(lowered.get("x-billhook-idempotency-key", ""))
    if from_key is not None:
        return from_key
    kind = _KIND_ALIASES.get(lowered.get("x-billhook-effect", "").lower())
    text = f"{subject}\n{body}"
    if kind is None:
        kind = _kind_from_subject(subject)
    invoice = lowered.get("x-billhook-invoice") or _first(_INVOICE, text)
    if kind is None or invoice is None:
        return None
    ref = lowered.get("x-billhook-ref", "")
    if not ref and kind == REFUND_NOTICE:
        ref = _first(_REFUND, text) or ""
    if not ref and kind == PAYMENT_FAILED:
        ref = _first(_ATTEMPT, text) or ""
    return EffectRef(kind, invoice, ref)


def _from_idempotency_key(key: str) -> EffectRef | None:
    parts = key.split(":")
    kind = _KIND_ALIASES.get(parts[0].lower()) if parts else None
    if kind is None or len(parts) < 2 or not parts[1]:
        return None
    return EffectRef(kind, parts[1], ":".join(parts[2:]))


def _kind_from_subject(subject: str) -> str | None:
    lowered = subject.lower()
    if "refund" in lowered:
        return REFUND_NOTICE
    if "fail" in lowered or "declined" in lowered:
        return PAYMENT_FAILED
    if "receipt" in lowered or "paid" in lowered or "payment received" in lowered:
        return RECEIPT
    return None


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return match.group(1) if match else None
