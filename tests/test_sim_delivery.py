"""The delivery plan covers every event, duplicates some, and signs exactly as Stripe does."""

from __future__ import annotations

import random
import time
from collections import Counter

import stripe

from billhook.sim.delivery import (
    DeliveryOptions,
    backoff_seconds,
    plan_deliveries,
    stripe_signature,
)
from billhook.sim.histories import generate_histories


def test_the_signature_verifies_with_the_stripe_library() -> None:
    body = b'{"id": "evt_1", "object": "event"}'
    now = int(time.time())
    header = stripe_signature("whsec_test", body, now)
    assert header == stripe.WebhookSignature.generate_signature_header(
        body.decode(), "whsec_test", timestamp=now
    )
    assert stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_test", 300)


def test_every_event_is_planned_and_duplicates_come_later() -> None:
    histories = generate_histories(11, 40)
    options = DeliveryOptions(duplicates=0.3, reorder=True, burst=True)
    plan = plan_deliveries(histories, random.Random(1), options)
    counts = Counter(p.event.event_id for p in plan)
    assert set(counts) == {e.event_id for h in histories for e in h.events}
    assert sum(p.duplicate for p in plan) == len(plan) - len(counts) > 0
    first_seen: set[str] = set()
    for item in plan:
        assert item.duplicate == (item.event.event_id in first_seen)
        first_seen.add(item.event.event_id)
    waves = [p.wave for p in plan]
    assert waves == sorted(waves) and len(set(waves)) > 1


def test_without_reorder_each_invoice_keeps_provider_order() -> None:
    histories = generate_histories(5, 30)
    plan = plan_deliveries(histories, random.Random(2), DeliveryOptions(duplicates=0.0))
    for history in histories:
        mine = [p.event.event_id for p in plan if p.event.invoice_id == history.invoice_id]
        assert mine == [e.event_id for e in history.events]


def test_backoff_grows_and_is_capped() -> None:
    options = DeliveryOptions(retry_base_seconds=0.1, retry_max_seconds=1.0)
    rng = random.Random(0)
    delays = [backoff_seconds(n, rng, options) for n in range(1, 12)]
    assert 0.05 <= delays[0] <= 0.1
    assert max(delays) <= 1.0 and delays[-1] >= 0.5
