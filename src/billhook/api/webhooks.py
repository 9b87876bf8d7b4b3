"""`POST /webhooks/stripe` and `POST /webhooks/standard`: plain Starlette routes, the hot path.

Each delivery is size-capped while read, verified over the raw bytes, checked for its envelope,
then committed (with its processing job) before the 2xx. Every outcome is counted and logged once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billhook.api.errors import error_response
from billhook.api.metrics import OUTCOMES, WEBHOOK_DURATION, WEBHOOKS_RECEIVED
from billhook.config import Settings
from billhook.errors import BillhookError, MalformedPayload, PayloadTooLarge
from billhook.ingest import EventWriter
from billhook.observability import get_logger
from billhook.sources import IncomingEvent, standard, stripe

log = get_logger("billhook.webhooks")

Verifier = Callable[[bytes, Request, Settings, float], IncomingEvent]


def _verify_stripe(body: bytes, request: Request, settings: Settings, now: float) -> IncomingEvent:
    signed_at = stripe.verify(
        body,
        request.headers.get(stripe.SIGNATURE_HEADER),
        settings.stripe_secrets,
        now=now,
        tolerance=settings.signature_tolerance_seconds,
    )
    return stripe.parse(body, request.headers, signed_at=signed_at)


def _verify_standard(
    body: bytes, request: Request, settings: Settings, now: float
) -> IncomingEvent:
    msg_id, signed_at = standard.verify(
        body,
        request.headers,
        settings.standard_secrets,
        now=now,
        tolerance=settings.signature_tolerance_seconds,
    )
    return standard.parse(body, request.headers, msg_id=msg_id, signed_at=signed_at)


def _endpoint(source: str, verify: Verifier) -> Callable[[Request], Awaitable[Response]]:
    counters = {outcome: WEBHOOKS_RECEIVED.labels(source, outcome) for outcome in OUTCOMES}
    duration = WEBHOOK_DURATION.labels(source)

    async def receive(request: Request) -> Response:
        started = time.perf_counter()
        received_at = time.time()
        state = request.app.state
        settings: Settings = state.settings
        event: IncomingEvent | None = None
        try:
            body = await _read_body(request, settings.max_body_bytes)
            event = verify(body, request, settings, received_at)
            writer: EventWriter = state.writer
            recorded = await writer.store(event, received_at)
        except BillhookError as exc:
            outcome = getattr(exc, "outcome", "store_unavailable")
            response: Response = error_response(exc)
            _finish(counters, duration, started, source, event, outcome, str(exc))
            return response
        if recorded.enqueued and state.on_enqueued is not None:
            state.on_enqueued()
        _finish(counters, duration, started, source, event, recorded.status, None)
        return Response(
            orjson.dumps({"status": recorded.status, "event_id": event.event_id}),
            media_type="application/json",
        )

    return receive


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
    fields: dict[str, object] = {
        "source": source,
        "outcome": outcome,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if event is not None:
        fields["event_id"] = event.event_id
        fields["type"] = event.type
    if detail is not None:
        # The detail names the failed check, never a secret or a full signature.
        log.warning("webhook refused", detail=detail, **fields)
    else:
        log.info("webhook stored", **fields)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise MalformedPayload("Content-Length is not a number: send a valid header") from None
        if length > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"body is over the {limit} byte limit: send a smaller event or raise "
        "BILLHOOK_MAX_BODY_BYTES"
    )


def routes() -> list[Route]:
    return [
        Route("/webhooks/stripe", _endpoint("stripe", _verify_stripe), methods=["POST"]),
        Route("/webhooks/standard", _endpoint("standard", _verify_standard), methods=["POST"]),
    ]

