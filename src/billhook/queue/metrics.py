"""Queue metrics read from the database at scrape time.

Workers are separate processes and /metrics is served by the API process, so in-process
counters would only see the API's own share. The database sees every worker: this collector
turns `jobs` and `job_attempts` into Prometheus families on each scrape (a few aggregate
queries; the duration histogram scans `job_attempts`, so prune old attempts on big installs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy.engine import Engine

from billhook.errors import BillhookError
from billhook.observability import get_logger
from billhook.queue.stats import queue_stats
from billhook.store.schema import job_attempts

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_log = get_logger(__name__)


class QueueCollector(Collector):
    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except (BillhookError, sa.exc.SQLAlchemyError) as exc:
            # A scrape must not fail because the database blinked; the gap shows in the graphs.
            _log.warning("queue_metrics_unavailable", error=str(exc))

    def _collect(self) -> Iterator[Metric]:
        stats = queue_stats(self.engine, now=self._clock())
        by_state = GaugeMetricFamily("billhook_jobs", "Jobs by state", labels=["state"])
        for state, count in sorted(stats.by_state.items()):
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily(
            "billhook_queue_oldest_pending_age_seconds",
            "Age of the oldest job waiting to run (available or retryable)",
            value=stats.oldest_pending_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "billhook_queue_paused", "1 while processing is paused", value=int(stats.paused)
        )
        yield from self._attempts()

    def _attempts(self) -> Iterator[Metric]:
        duration = job_attempts.c.finished_at - job_attempts.c.started_at
        with self.engine.connect() as connection:
            outcomes = connection.execute(
                sa.select(job_attempts.c.outcome, sa.func.count()).group_by(job_attempts.c.outcome)
            ).all()
            retries = connection.execute(
                sa.select(sa.func.count()).where(job_attempts.c.attempt > 1)
            ).scalar_one()
            bucket_columns = [
                sa.func.coalesce(sa.func.sum(sa.case((duration <= bound, 1), else_=0)), 0)
                for bound in DURATION_BUCKETS
            ]
            histogram_row = connection.execute(
                sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(duration), 0.0), *bucket_columns
                ).where(job_attempts.c.finished_at.is_not(None))
            ).one()
        attempts = CounterMetricFamily(
            "billhook_job_attempts", "Finished job attempts by outcome", labels=["outcome"]
        )
        counts = {outcome: int(count) for outcome, count in outcomes}
        for outcome in ("completed", "failed", "rescued", "released"):
            attempts.add_metric([outcome], counts.get(outcome, 0))
        yield attempts
        yield CounterMetricFamily(
            "billhook_job_retries", "Attempts after a job's first", value=int(retries)
        )
        yield CounterMetricFamily(
            "billhook_job_rescued_leases",
            "Jobs taken back from a worker whose lease expired",
            value=counts.get("rescued", 0),
        )
        total, total_seconds, *cumulative = histogram_row
        pairs = zip(DURATION_BUCKETS, cumulative, strict=True)
        buckets = [(str(bound), int(count)) for bound, count in pairs]
        buckets.append(("+Inf", int(total)))
        yield HistogramMetricFamily(
            "billhook_job_duration_seconds",
            "Duration of finished job attempts",
            buckets=buckets,
            sum_value=float(total_seconds),
        )


def register_queue_metrics(registry: CollectorRegistry, engine: Engine) -> QueueCollector:
    """Add the queue's families to `registry` (the API app calls this once)."""
    collector = QueueCollector(engine)
    registry.register(collector)
    return collector
