"""Benchmark events: fresh signed Stripe `invoice.paid` deliveries, and a direct store seeder."""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
from sqlalchemy.engine import Engine

from bench._common import STRIPE_SECRET
from billhook.sources import stripe
from billhook.sources.templates import build_event, new_id
from billhook.store.events import Arrival, record_many


def paid_bodies(count: int, now: int | None = None) -> Iterator[tuple[str, bytes]]:
    """`count` (invoice id, body) pairs: each a new invoice paid once (so one receipt each)."""
    stamp = now if now is not None else int(time.time())
    template = build_event("invoice.paid", invoice_id=None, now=stamp)
    invoice = template["data"]["object"]
    for _ in range(count):
        invoice_id = new_id("in")
        template["id"] = new_id("evt")
        invoice["id"] = invoice_id
        if isinstance(invoice.get("charge"), str):
            invoice["charge"] = "ch_" + invoice_id.removeprefix("in_")
        yield invoice_id, orjson.dumps(template)


def signed(body: bytes, now: int) -> str:
    return stripe.sign(body, STRIPE_SECRET, now)


def seed(engine: Engine, count: int, *, batch: int = 500) -> list[str]:
    """Store `count` events and their jobs as ingest would (group commits of `batch`)."""
    now = int(time.time())
    invoice_ids: list[str] = []
    arrivals: list[Arrival] = []
    for invoice_id, body in paid_bodies(count, now):
        invoice_ids.append(invoice_id)
        arrivals.append(Arrival(stripe.parse(body, {}, signed_at=now), time.time()))
        if len(arrivals) == batch:
            record_many(engine, arrivals, now=time.time(), max_attempts=10)
            arrivals = []
    if arrivals:
        record_many(engine, arrivals, now=time.time(), max_attempts=10)
    return invoice_ids
