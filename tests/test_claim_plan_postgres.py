"""A claim on a young PostgreSQL database stays a short walk as the queue grows.

Without column statistics (before autovacuum's first ANALYZE) PostgreSQL planned the claim to
run both key tests on every waiting job and sort them all, whatever the claim's limit; a plan
cached then kept that shape. The worker refreshes the statistics of tables that changed a lot
(`store.planner_statistics`) before its rounds. This counts the index scans of one claim, in
its own transaction, after the plan had every chance to be cached small.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billhook.queue.claims import claim_in
from billhook.queue.jobs import enqueue
from billhook.store.engine import create_engine
from billhook.store.planner_statistics import PlannerStatistics

pytestmark = pytest.mark.postgres

T0 = 1_700_000_000.0
WAITING = 3_000


def _claim(connection: Connection, limit: int) -> list[int]:
    jobs = claim_in(connection, worker_id="w1", now=T0, lease_seconds=30.0, limit=limit)
    return [job.id for job in jobs]


def _jobs_index_scans(connection: Connection) -> int:
    """Index scans of `jobs` by this transaction so far (counted before any flush)."""
    return int(
        connection.exec_driver_sql(
            "SELECT idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'"
        ).scalar_one()
    )


def test_a_claim_walks_a_few_jobs_once_the_statistics_are_refreshed(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            with connection.begin():
                for i in range(3):
                    enqueue(connection, ordering_key=f"in_{i}", order_ts=T0 + i, now=T0,
                            max_attempts=3)
            # Ten claims while three jobs wait, each rolled back: enough for psycopg to
            # prepare the statement and for PostgreSQL to settle on a plan for a small table.
            for _ in range(10):
                with connection.begin() as transaction:
                    assert len(_claim(connection, limit=2)) == 2
                    transaction.rollback()
            with connection.begin():
                connection.execute(
                    sa.text(
                        "INSERT INTO jobs (kind, ordering_key, order_ts, state, attempts, "
                        "max_attempts, run_at, created_at) SELECT 'process_event', "
                        "'in_' || g, :t0 + g, 'available', 0, 3, :t0, :t0 "
                        "FROM generate_series(3, :last) AS g"
                    ),
                    {"t0": T0, "last": WAITING + 2},
                )
            # What the worker's fetcher does before a round; the counts of changed rows reach
            # pg_stat_user_tables once this session's pending statistics are flushed.
            with connection.begin():
                connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            statistics = PlannerStatistics()
            assert "jobs" in statistics.refresh(connection)
            assert statistics.refresh(connection) == []  # checked at most every few seconds
            with connection.begin():
                before = _jobs_index_scans(connection)
                claimed = _claim(connection, limit=5)
                scans = _jobs_index_scans(connection) - before
        assert len(claimed) == 5
        # In provider order: the first five keys.
        with engine.connect() as connection:
            keys = connection.execute(
                sa.text("SELECT ordering_key FROM jobs WHERE id = ANY(:ids) ORDER BY order_ts"),
                {"ids": claimed},
            ).scalars().all()
        assert keys == [f"in_{i}" for i in range(5)]
        # A walk: a few scans per claimed job (its key tests, the update), not two per waiting
        # job (6,012 without the refresh).
        assert scans < 100, scans
    finally:
        engine.dispose()
