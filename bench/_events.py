"""Benchmark events: fresh signed Stripe deliveries (`invoice.paid` alone, or whole simulated
invoice histories) and direct store seeders that write through ingest's own statements."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Sequence

import orjson
from sqlalchemy.engine import Engine

from bench._common import STRIPE_SECRET
from billhook.sim.histories import generate_histories
from billhook.sources import stripe
from billhook.sources.templates import build_event, new_id
from billhook.store.engine import transaction
from billhook.store.events import Arrival, record_batch, record_many


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


# Every provider id in a simulated history (events, invoices, charges, refunds, ...): the last
# eight characters become the copy number, so one pool of histories stamps out any number of
# distinct invoices at the cost of a bytes.replace per event.
_ID = re.compile(rb'"((?:evt|in|ch|re|pi|dp|txn|req|cus|il)_[A-Za-z0-9]{6,})"')
_MARK = b"~~~~~~~~"
# Copies are this many seconds apart in provider time, more than one history spans, so the queue
# (which runs jobs in provider order) takes a copy's events before the next copy's.
COPY_SPAN_SECONDS = 100_000


class HistoryPool:
    """Realistic Stripe traffic for volume benchmarks: `billhook.sim.histories`, stamped out.

    `invoices` histories are generated once (drafts, failed attempts, payments announced twice by
    `invoice.paid` and `invoice.payment_succeeded`, partial and full refunds, disputes, voids);
    `copy(n)` is every event of every history with fresh ids, a delivery retried by the provider
    now and then (`duplicate_rate`). One copy is about 5.7 events and 2 emails per invoice.
    """

    def __init__(self, invoices: int = 200, *, seed: int = 7, duplicate_rate: float = 0.05):
        histories = generate_histories(seed, invoices)
        self._templates: list[bytes] = []
        for history in histories:
            for event in history.events:
                body = orjson.dumps(event.body)
                self._templates.append(_ID.sub(lambda m: m.group()[:-9] + _MARK + b'"', body))
        step = max(1, round(1 / duplicate_rate)) if duplicate_rate > 0 else 0
        self._duplicates = set(range(0, len(self._templates), step)) if step else set()

    @property
    def events_per_copy(self) -> int:
        return len(self._templates)

    def copy(self, n: int, *, received_at: float | None = None) -> list[Arrival]:
        """Copy `n` (0 <= n < 16**8) as arrivals: distinct events plus their retried deliveries."""
        stamp = b"%08x" % n
        at = received_at if received_at is not None else time.time()
        now = int(at)
        shift = n * COPY_SPAN_SECONDS
        arrivals: list[Arrival] = []
        for index, template in enumerate(self._templates):
            event = stripe.parse(template.replace(_MARK, stamp), {}, signed_at=now)
            if event.occurred_at is not None:
                event = dataclasses.replace(event, occurred_at=event.occurred_at + shift)
            arrivals.append(Arrival(event, at))
            if index in self._duplicates:
                arrivals.append(Arrival(event, at))
        return arrivals


def store(engine: Engine, arrivals: Sequence[Arrival], *, batch: int = 2000) -> int:
    """Store deliveries through ingest's own write, in one transaction; returns events accepted.

    `batch` bounds one statement (SQLite allows 32,766 bound parameters, ten per event)."""
    accepted = 0
    now = time.time()
    with transaction(engine) as connection:
        for start in range(0, len(arrivals), batch):
            recorded = record_batch(
                connection, arrivals[start : start + batch], now=now, max_attempts=10
            )
            accepted += sum(1 for r in recorded if r.enqueued)
    return accepted
