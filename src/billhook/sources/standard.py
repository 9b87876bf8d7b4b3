"""Standard Webhooks: the `webhook-*` signature scheme (verify, sign) and the canonical event.

Signed content is `"<webhook-id>.<webhook-timestamp>.<raw body>"`, HMAC-SHA256 keyed with the
base64-decoded secret (after its `whsec_` prefix), sent as space-separated `v1,<base64>` entries.
The `svix-*` header names are accepted as aliases. The dedupe key is `webhook-id`.

The canonical event (the body) is `{"id", "type", "occurred_at", "data": {"invoice_id", ...}}`;
ingest checks `id`, `type` and `data.invoice_id`, the rest is processing's job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from billhook.errors import ConfigError, MalformedPayload, SignatureError, TimestampError
from billhook.sources import IncomingEvent, bounded

SOURCE = "standard"
SECRET_PREFIX = "whsec_"
_ALIASES = ("webhook", "svix")
_KEPT_HEADERS = ("content-type", "user-agent")


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret; a missing base64 padding is tolerated."""
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            "a Standard Webhooks secret is not 'whsec_' + base64: fix "
            "BILLHOOK_STANDARD_WEBHOOK_SECRETS"
        ) from exc
    if not key:
        raise ConfigError(
            "a Standard Webhooks secret is empty: fix BILLHOOK_STANDARD_WEBHOOK_SECRETS"
        )
    return key


def compute_signature(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(payload: bytes, secret: str, msg_id: str, timestamp: int) -> dict[str, str]:
    """The three headers a Standard Webhooks sender would attach to this payload."""
    digest = compute_signature(decode_secret(secret), msg_id, timestamp, payload)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def verify(
    payload: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    now: float,
    tolerance: float,
) -> tuple[str, int]:
    """Check the signature over the raw bytes; return (webhook-id, timestamp) or raise."""
    msg_id, raw_timestamp, raw_signatures = _signature_headers(headers)
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise SignatureError(
            "webhook-timestamp is not an integer number of seconds: send the signed timestamp"
        ) from None
    keys = _usable_keys(secrets)
    if not keys:
        raise SignatureError(
            "no Standard Webhooks secret is configured: set BILLHOOK_STANDARD_WEBHOOK_SECRETS"
        )
    offered = [_decode_entry(entry) for entry in raw_signatures.split(" ")]
    expected = [compute_signature(key, msg_id, timestamp, payload) for key in keys]
    matched = False
    for candidate in offered:
        for digest in expected:
            # A malformed entry is compared as empty bytes: it never matches, at the same cost.
            matched |= hmac.compare_digest(candidate or b"", digest)
    if not matched:
        raise SignatureError(
            "webhook-signature does not match: check the secret in "
            "BILLHOOK_STANDARD_WEBHOOK_SECRETS and that webhook-id, webhook-timestamp and the "
            "body are sent exactly as signed (only 'v1,<base64>' entries count)"
        )
    if timestamp < now - tolerance:
        raise TimestampError(
            f"webhook-timestamp is {now - timestamp:.0f} s old, over the {tolerance:.0f} s "
            "tolerance: re-send with a fresh timestamp and signature"
        )
    if timestamp > now + tolerance:
        raise TimestampError(
            f"webhook-timestamp is {timestamp - now:.0f} s in the future, over the "
            f"{tolerance:.0f} s tolerance: check the sender's clock"
        )
    return msg_id, timestamp


def _signature_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    for prefix in _ALIASES:
        values = [headers.get(f"{prefix}-{name}") for name in ("id", "timestamp", "signature")]
        if any(values):
            msg_id, timestamp, signature = values
            if msg_id and timestamp and signature:
                return msg_id, timestamp, signature
            missing = [
                f"{prefix}-{name}"
                for name, value in zip(("id", "timestamp", "signature"), values, strict=True)
                if not value
            ]
            raise SignatureError(
                f"missing {', '.join(missing)} header: Standard Webhooks needs webhook-id, "
                "webhook-timestamp and webhook-signature"
            )
    raise SignatureError(
        "missing webhook-id, webhook-timestamp and webhook-signature headers: sign the "
        "delivery with Standard Webhooks"
    )


def _usable_keys(secrets: Sequence[str]) -> list[bytes]:
    keys = []
    for secret in secrets:
        try:
            keys.append(decode_secret(secret))
        except ConfigError:
            continue
    return keys


def _decode_entry(entry: str) -> bytes | None:
    version, sep, value = entry.partition(",")
    if version != "v1" or not sep:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def parse(body: bytes, headers: Mapping[str, str], *, msg_id: str, signed_at: int) -> IncomingEvent:
    """The envelope checks of the canonical event: `id`, `type`, `data.invoice_id`."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayload(
            f"body is not valid JSON ({exc}): send billhook's canonical event JSON"
        ) from exc
    if not isinstance(event, dict):
        raise MalformedPayload("body is JSON but not an object: send the canonical event object")
    for field in ("id", "type"):
        if not isinstance(event.get(field), str) or not event[field]:
            raise MalformedPayload(
                f"canonical event has no string '{field}': see the canonical event format"
            )
    data = event.get("data")
    invoice_id = data.get("invoice_id") if isinstance(data, dict) else None
    if not isinstance(invoice_id, str) or not invoice_id:
        raise MalformedPayload(
            "canonical event has no string 'data.invoice_id': every event names its invoice"
        )
    return IncomingEvent(
        source=SOURCE,
        event_id=bounded(msg_id, "webhook-id"),
        type=bounded(event["type"], "event 'type'"),
        ordering_key=bounded(invoice_id, "'data.invoice_id'"),
        occurred_at=parse_occurred_at(event.get("occurred_at")),
        headers={
            **{name: headers[name] for name in _KEPT_HEADERS if name in headers},
            "webhook-id": msg_id,
            "webhook-timestamp": str(signed_at),
        },
        body=body,
    )


def parse_occurred_at(value: Any) -> float | None:
    """RFC 3339 text or epoch seconds; anything else is left for processing to judge."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None
        return moment.timestamp()
    return None
