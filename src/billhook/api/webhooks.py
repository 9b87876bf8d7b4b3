"""`POST /webhooks/stripe` and `POST /webhooks/standard`: raw ASGI handlers, the hot path.

Each delivery is size-capped while read, verified over the raw bytes, checked for its envelope,
then committed (with its processing job) before the 2xx. Every outcome is counted and logged once.

The handlers speak ASGI directly and the app (`api/app.py`) consults them before its middleware
and router: Starlette's request, response, router and middleware objects cost more per delivery
than the signature check and the JSON parse together. Other methods on these paths still reach
Starlette's routes (405), and every answer stays what the routes answered: JSON, `detail` on
errors, `Retry-After` on 503.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from billhook.api.errors import status_code_for
from billhook.api.metrics import OUTCOMES, WEBHOOK_DURATION, WEBHOOKS_RECEIVED
from billhook.config import Settings
from billhook.errors import BillhookError, MalformedPayload, PayloadTooLarge
from billhook.ingest import EventWriter
from billhook.observability import get_logger
from billhook.sources import IncomingEvent, standard, stripe

log = get_logger("billhook.webhooks")

Verifier = Callable[[bytes, Mapping[str, str], Settings, float], IncomingEvent]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


def _verify_stripe(
    body: bytes, headers: Mapping[str, str], settings: Settings, now: float
) -> IncomingEvent:
    signed_at = stripe.verify(
        body,
        headers.get(stripe.SIGNATURE_HEADER),
        settings.stripe_secrets,
        now=now,
        tolerance=settings.signature_tolerance_seconds,
    )
    return stripe.parse(body, headers, signed_at=signed_at)


def _verify_standard(
    body: bytes, headers: Mapping[str, str], settings: Settings, now: float
) -> IncomingEvent:
    msg_id, signed_at = standard.verify(
        body,
        headers,
        settings.standard_secrets,
        now=now,
        tolerance=settings.signature_tolerance_seconds,
    )
    return standard.parse(body, headers, msg_id=msg_id, signed_at=signed_at)


class _ClientGone(Exception):
    """The client disconnected before its body was read: nobody to answer."""


def _endpoint(source: str, verify: Verifier, state: Any) -> Handler:
    """The ASGI handler of one source; `state` is the app's state (settings, writer, hook)."""
    counters = {outcome: WEBHOOKS_RECEIVED.labels(source, outcome) for outcome in OUTCOMES}
    duration = WEBHOOK_DURATION.labels(source)

    async def receive_delivery(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        received_at = time.time()
        settings: Settings = state.settings
        event: IncomingEvent | None = None
        # ASGI header names are lower-case bytes; the first of repeated headers wins, as in
        # Starlette's `Headers.get`.
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in reversed(scope["headers"])
        }
        try:
            body = await _read_body(receive, headers, settings.max_body_bytes)
            event = verify(body, headers, settings, received_at)
            writer: EventWriter = state.writer
            recorded = await writer.store(event, received_at)
        except _ClientGone:
            return
        except BillhookError as exc:
            outcome = getattr(exc, "outcome", "store_unavailable")
            status = status_code_for(exc)
            await _answer(send, status, orjson.dumps({"detail": str(exc)}), retry=status == 503)
            _finish(counters, duration, started, source, event, outcome, str(exc))
            return
        if recorded.enqueued:
            on_enqueued = state.on_enqueued
            if on_enqueued is not None:
                on_enqueued()
        await _answer(
            send, 200, orjson.dumps({"status": recorded.status, "event_id": event.event_id})
        )
        _finish(counters, duration, started, source, event, recorded.status, None)

    return receive_delivery


async def _answer(send: Send, status: int, body: bytes, *, retry: bool = False) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _finish(
    counters: dict[str, Counter],
    duration: Histogram,
    started: float,
    source: str,
    event: IncomingEvent | None,
    outcome: str,
    detail: str | None,
) -> None:
    elapsed = time.perf_counter() - started
    counters[outcome].inc()
    duration.observe(elapsed)
    duration_ms = round(elapsed * 1000, 3)
    if detail is None:
        assert event is not None
        log.info(
            "webhook stored",
            source=source,
            outcome=outcome,
            duration_ms=duration_ms,
            event_id=event.event_id,
            type=event.type,
        )
        return
    fields: dict[str, object] = {
        "source": source,
        "outcome": outcome,
        "duration_ms": duration_ms,
    }
    if event is not None:
        fields["event_id"] = event.event_id
        fields["type"] = event.type
    # The detail names the failed check, never a secret or a full signature.
    log.warning("webhook refused", detail=detail, **fields)


async def _read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise MalformedPayload("Content-Length is not a number: send a valid header") from None
        if length > limit:
            raise _too_large(limit)
    message = await receive()
    if message["type"] != "http.request":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise _too_large(limit)
    if not message.get("more_body", False):
        return body  # the usual case: the whole body in one message
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"body is over the {limit} byte limit: send a smaller event or raise "
        "BILLHOOK_MAX_BODY_BYTES"
    )


def handlers(state: Any) -> dict[str, Handler]:
    """`POST` path -> raw ASGI handler; the app consults it before its router."""
    return {
        "/webhooks/stripe": _endpoint("stripe", _verify_stripe, state),
        "/webhooks/standard": _endpoint("standard", _verify_standard, state),
    }


async def _method_not_allowed(_request: Request) -> Response:  # pragma: no cover - never called
    raise AssertionError("POST /webhooks/* is answered by the raw handlers")


def routes() -> list[Route]:
    """The webhook paths in Starlette's router, so other methods get its 405 (POST never
    reaches them: the app answers it first)."""
    return [
        Route("/webhooks/stripe", _method_not_allowed, methods=["POST"]),
        Route("/webhooks/standard", _method_not_allowed, methods=["POST"]),
    ]
