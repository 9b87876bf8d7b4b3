"""Stripe webhooks: the `Stripe-Signature` scheme (verify and sign) and the event envelope.

`t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`; the secret is used verbatim. Several
`v1` entries and several configured secrets allow rotation. Unlike the Stripe SDKs, timestamps
more than the tolerance in the *future* are refused too: a signed request from the future is a
clock problem or a forgery, never something to store.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from billhook.errors import MalformedPayload, SignatureError, TimestampError
from billhook.sources import IncomingEvent, bounded

SOURCE = "stripe"
SIGNATURE_HEADER = "stripe-signature"
# Stored with the event; signatures are not kept (the signed timestamp is).
_KEPT_HEADERS = ("content-type", "user-agent")


def compute_signature(secret: str, timestamp: int, payload: bytes) -> str:
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header value Stripe would send for this payload."""
    return f"t={timestamp},v1={compute_signature(secret, timestamp, payload)}"


def verify(
    payload: bytes, header: str | None, secrets: Sequence[str], *, now: float, tolerance: float
) -> int:
    """Check the signature over the raw bytes; return the signed timestamp or raise."""
    if not header:
        raise SignatureError(
            "missing Stripe-Signature header: send the header Stripe computed for this body"
        )
    timestamp, signatures = _parse_header(header)
    if not signatures:
        raise SignatureError(
            "Stripe-Signature has no v1 signature: expected 't=<unix>,v1=<hex>' "
            "(v0 and other schemes are not accepted)"
        )
    if not secrets:
        raise SignatureError(
            "no Stripe webhook secret is configured: set BILLHOOK_STRIPE_WEBHOOK_SECRETS"
        )
    expected = [compute_signature(secret, timestamp, payload) for secret in secrets]
    # Compare every pair so the time taken does not depend on which one matched.
    matched = False
    for candidate in signatures:
        for digest in expected:
            matched |= hmac.compare_digest(candidate.encode(), digest.encode())
    if not matched:
        raise SignatureError(
            "Stripe-Signature does not match the body: check that the endpoint secret "
            "(whsec_...) is the one in BILLHOOK_STRIPE_WEBHOOK_SECRETS and that the body is "
            "sent byte for byte as signed"
        )
    if timestamp < now - tolerance:
        raise TimestampError(
            f"Stripe-Signature timestamp is {now - timestamp:.0f} s old, over the "
            f"{tolerance:.0f} s tolerance: re-send the event so Stripe signs it afresh"
        )
    if timestamp > now + tolerance:
        raise TimestampError(
            f"Stripe-Signature timestamp is {timestamp - now:.0f} s in the future, over the "
            f"{tolerance:.0f} s tolerance: check the sender's clock"
        )
    return timestamp


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    # Like the SDKs, items are not trimmed: ' v1=' is not a v1 entry.
    for item in header.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                timestamp = None
        elif key == "v1":
            signatures.append(value)
    if timestamp is None:
        raise SignatureError(
            "cannot read Stripe-Signature: expected 't=<unix seconds>,v1=<hex signature>'"
        )
    return timestamp, signatures


def parse(body: bytes, headers: Mapping[str, str], *, signed_at: int) -> IncomingEvent:
    """The envelope checks: a JSON object with string `id` and `type`."""
    event = _load_object(body)
    event_id = event.get("id")
    event_type = event.get("type")
    if not isinstance(event_id, str) or not event_id:
        raise MalformedPayload("Stripe event has no string 'id': send the event object as is")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedPayload("Stripe event has no string 'type': send the event object as is")
    created = event.get("created")
    occurred_at = (
        float(created)
        if isinstance(created, int | float) and not isinstance(created, bool)
        else None
    )
    return IncomingEvent(
        source=SOURCE,
        event_id=bounded(event_id, "event 'id'"),
        type=bounded(event_type, "event 'type'"),
        ordering_key=bounded(ordering_key(event), "the invoice or charge id"),
        occurred_at=occurred_at,
        headers={
            **{name: headers[name] for name in _KEPT_HEADERS if name in headers},
            "stripe-signature-timestamp": str(signed_at),
        },
        body=body,
    )


def ordering_key(event: Mapping[str, Any]) -> str:
    """Events about one invoice share a key (the invoice id); charge-only ones use the charge."""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if isinstance(obj, dict):
        kind = obj.get("object")
        if kind == "invoice" and _id_of(obj.get("id")):
            return str(obj["id"])
        invoice = _id_of(obj.get("invoice"))
        if invoice:
            return invoice
        if kind == "charge" and _id_of(obj.get("id")):
            return f"charge:{obj['id']}"
        charge = _id_of(obj.get("charge"))
        if charge:
            return f"charge:{charge}"
    return f"event:{event.get('id')}"


def _id_of(value: Any) -> str | None:
    """An id field may be a string or, when expanded, an object with an `id`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayload(f"body is not valid JSON ({exc}): send the event as JSON") from exc
    if not isinstance(value, dict):
        raise MalformedPayload("body is JSON but not an object: send the event object")
    return value
