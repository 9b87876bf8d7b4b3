"""Prometheus metrics of the HTTP side, and `GET /metrics`."""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billhook.effects.metrics import EffectsCollector
from billhook.queue.metrics import register_queue_metrics

OUTCOMES = (
    "accepted",
    "duplicate",
    "rejected_signature",
    "rejected_timestamp",
    "rejected_malformed",
    "rejected_too_large",
    "store_unavailable",
)

WEBHOOKS_RECEIVED = Counter(
    "billhook_webhooks_received_total",
    "Webhook deliveries by source and outcome.",
    ["source", "outcome"],
)
WEBHOOK_DURATION = Histogram(
    "billhook_webhook_request_duration_seconds",
    "Time from reading a webhook request to answering it (commit included), by source.",
    ["source"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# Every series exists from the start, so a rate() over a quiet outcome reads 0, not "no data".
for _source in ("stripe", "standard"):
    WEBHOOK_DURATION.labels(_source)
    for _outcome in OUTCOMES:
        WEBHOOKS_RECEIVED.labels(_source, _outcome)


def routes(engine: Engine) -> list[Route]:
    """`GET /metrics`: this process's counters, then the queue and outbox read from the store
    (workers are other processes; the database is where all their work shows)."""
    store_registry = CollectorRegistry(auto_describe=False)
    register_queue_metrics(store_registry, engine)
    store_registry.register(EffectsCollector(engine))

    async def metrics(_request: Request) -> Response:
        body = generate_latest(REGISTRY)
        # Database down: /readyz says so; the HTTP counters are still worth serving.
        with contextlib.suppress(SQLAlchemyError):
            body += await run_in_threadpool(generate_latest, store_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics, methods=["GET"])]
