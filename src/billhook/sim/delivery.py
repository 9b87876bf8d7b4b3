"""Deliver events like a provider on a bad day: signed as Stripe signs, duplicated, reordered,
in bursts, concurrently, and retried after any non-2xx or timeout with a compressed backoff.

`plan_deliveries` is pure (seeded); `deliver` is the async shell that sends the plan.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import orjson

from billhook.sim.checker import DeliveryStats
from billhook.sim.histories import History, ProviderEvent

USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"


@dataclass(frozen=True)
class DeliveryOptions:
    duplicates: float = 0.1
    reorder: bool = False
    burst: bool = False
    concurrency: int = 8
    timeout_seconds: float = 5.0
    # Stripe retries for three days with growing gaps; compressed here to seconds.
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 3.0
    retry_horizon_seconds: float = 90.0


@dataclass(frozen=True)
class PlannedDelivery:
    event: ProviderEvent
    wave: int
    duplicate: bool = False


@dataclass
class DeliveryLog:
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    duplicates_sent: int = 0
    last_ack_at: float = 0.0

    def stats(self) -> DeliveryStats:
        return DeliveryStats(
            attempts=self.attempts,
            acknowledged=self.statuses_2xx,
            statuses=dict(self.statuses),
            acked_event_ids=frozenset(self.acked),
            duplicates_sent=self.duplicates_sent,
        )

    @property
    def statuses_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.startswith("2"))


def stripe_signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `Stripe-Signature` header value: `t=…,v1=HMAC-SHA256(secret, "{t}.{body}")`."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def plan_deliveries(
    histories: Sequence[History], rng: random.Random, options: DeliveryOptions
) -> list[PlannedDelivery]:
    """The order events go out in, with duplicate copies, grouped in waves (bursts)."""
    if options.reorder:
        order = [e for h in histories for e in h.events]
        rng.shuffle(order)
    else:
        # Invoices interleave, each invoice's events keep provider order.
        queues = [list(h.events) for h in histories if h.events]
        order = []
        while queues:
            queue = rng.choice(queues)
            order.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    copies: dict[int, list[ProviderEvent]] = {}
    for position, event in enumerate(order):
        while rng.random() < options.duplicates:  # geometric: sometimes three copies
            copies.setdefault(rng.randint(position, len(order) - 1), []).append(event)
    planned: list[tuple[ProviderEvent, bool]] = []
    for position, event in enumerate(order):
        planned.append((event, False))
        planned.extend((copy, True) for copy in copies.get(position, ()))
    waves: list[PlannedDelivery] = []
    wave, left = 0, _wave_size(rng, options)
    for event, duplicate in planned:
        if left == 0:
            wave, left = wave + 1, _wave_size(rng, options)
        waves.append(PlannedDelivery(event, wave, duplicate))
        left -= 1
    return waves


def _wave_size(rng: random.Random, options: DeliveryOptions) -> int:
    return rng.randint(10, 120) if options.burst else options.concurrency


def backoff_seconds(attempt: int, rng: random.Random, options: DeliveryOptions) -> float:
    """Exponential with jitter, capped: attempt 1 waits about base, then doubles."""
    ceiling: float = min(options.retry_max_seconds, options.retry_base_seconds * 2 ** (attempt - 1))
    return ceiling / 2 + rng.random() * ceiling / 2


async def deliver(
    url: str,
    secret: str,
    plan: Sequence[PlannedDelivery],
    options: DeliveryOptions,
    rng: random.Random,
    log: DeliveryLog | None = None,
) -> DeliveryLog:
    """Send the plan to `url` (the Stripe webhook route); returns when every delivery got a 2xx
    or ran out of retries."""
    log = log or DeliveryLog()
    limit = asyncio.Semaphore(max(options.concurrency, 1))
    limits = httpx.Limits(max_connections=max(options.concurrency, 1) * 2)
    async with httpx.AsyncClient(timeout=options.timeout_seconds, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        current_wave = -1
        for item in plan:
            if item.wave != current_wave:
                if options.burst and current_wave >= 0:
                    await asyncio.sleep(rng.uniform(0.02, 0.3))  # a quiet gap between bursts
                current_wave = item.wave
            seed = rng.random()
            attempt = _deliver_one(
                client, url, secret, item, options, random.Random(seed), limit, log
            )
            tasks.append(asyncio.create_task(attempt))
        if tasks:
            await asyncio.gather(*tasks)
    return log


async def _deliver_one(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    item: PlannedDelivery,
    options: DeliveryOptions,
    rng: random.Random,
    limit: asyncio.Semaphore,
    log: DeliveryLog,
) -> None:
    body = orjson.dumps(item.event.body)
    deadline = time.monotonic() + options.retry_horizon_seconds
    attempt = 0
    if item.duplicate:
        log.duplicates_sent += 1
    while True:
        attempt += 1
        async with limit:
            status = await _post(client, url, secret, body)
        log.attempts += 1
        log.statuses[status] += 1
        if status.startswith("2"):
            log.acked.add(item.event.event_id)
            log.last_ack_at = time.time()
            return
        delay = backoff_seconds(attempt, rng, options)
        if time.monotonic() + delay > deadline:
            return
        await asyncio.sleep(delay)


async def _post(client: httpx.AsyncClient, url: str, secret: str, body: bytes) -> str:
    # Stripe signs every attempt afresh, with the time of that attempt.
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        "Stripe-Signature": stripe_signature(secret, body, int(time.time())),
    }
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "connection_error"
    return str(response.status_code)
