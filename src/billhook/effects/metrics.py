"""Prometheus counters of the effect dispatcher (default registry, served by `/metrics`)."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.engine import Engine

from billhook.store.schema import EFFECT_STATES, effect_attempts, effects

EFFECTS_SENT = Counter(
    "billhook_effects_sent", "Effects handed over and recorded as sent.", ["channel", "kind"]
)
EFFECTS_FAILED = Counter(
    "billhook_effects_failed",
    "Effect attempts that failed (each attempt counts once; retried or dead).",
    ["channel", "kind"],
)
EFFECTS_DEAD = Counter(
    "billhook_effects_dead",
    "Effects dead-lettered (out of attempts or unsendable).",
    ["channel", "kind"],
)
EFFECTS_RESENT = Counter(
    "billhook_effects_resent",
    "Effects handed over again under the same key after a dispatcher stopped between hand-over "
    "and record (possible duplicate delivery, same Message-ID / Idempotency-Key).",
    ["channel", "kind"],
)


class EffectsCollector:
    """The outbox as the database sees it, read at scrape time.

    The counters above live in the worker processes that send; the API process serves
    `/metrics`, so what an operator must see (backlog, dead letters, resends) is read from the
    store, where every process's work is.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        with self.engine.connect() as connection:
            by_state = connection.execute(
                sa.select(effects.c.state, effects.c.channel, sa.func.count()).group_by(
                    effects.c.state, effects.c.channel
                )
            ).all()
            resends = connection.execute(
                sa.select(sa.func.coalesce(sa.func.sum(effects.c.resends), 0))
            ).scalar_one()
            attempts = connection.execute(
                sa.select(effect_attempts.c.outcome, sa.func.count()).group_by(
                    effect_attempts.c.outcome
                )
            ).all()
        states = GaugeMetricFamily(
            "billhook_effects_by_state",
            "Outbox rows by state and channel",
            labels=["state", "channel"],
        )
        counts = {(state, channel): int(n) for state, channel, n in by_state}
        for state in EFFECT_STATES:
            for channel in ("email", "webhook"):
                states.add_metric([state, channel], counts.get((state, channel), 0))
        yield states
        yield CounterMetricFamily(
            "billhook_effect_resends",
            "Hand-overs repeated under the same key after a dispatcher stopped mid-send",
            value=int(resends),
        )
        outcomes = CounterMetricFamily(
            "billhook_effect_attempts", "Effect attempts by outcome", labels=["outcome"]
        )
        seen = {outcome: int(n) for outcome, n in attempts}
        for outcome in ("sending", "sent", "failed", "resent"):
            outcomes.add_metric([outcome], seen.get(outcome, 0))
        yield outcomes
