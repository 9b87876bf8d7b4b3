"""Fresh planner statistics on PostgreSQL for the tables whose plans change with their size.

A young database has no column statistics until autovacuum's first ANALYZE, which runs at most
once a minute per database (`autovacuum_naptime`) and only after enough rows changed. Until
then PostgreSQL's planner guesses: it took `state IN ('available', 'retryable')` to keep 1% of
the jobs, so with 5,000 jobs waiting the claim gathered every waiting job, ran both key tests on
each and sorted them all (200 ms a claim, 6,000 index scans for a claim of 5), where the plan
for its real size walks `ix_jobs_claimable` and stops after a few. A cached generic plan kept
that shape until the next ANALYZE. The pipeline benchmark on a fresh PostgreSQL database went
from 158-293 events/s, in the runs where autovacuum came late, to over 1,100.

`PlannerStatistics.refresh` analyzes such a table once a large share of it changed since its
last ANALYZE (autovacuum's own rule, with a threshold for tables that grew from nothing). The
worker calls it before its fetch rounds; a check is one query over `pg_stat_user_tables`, at
most every few seconds per process. ANALYZE reads a sample of at most 30,000 rows, whatever the
table's size, and a fresh ANALYZE makes PostgreSQL plan the cached statements again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.engine import Connection

from billhook.observability import get_logger

log = get_logger(__name__)

# The queue's and the outbox's tables, and what processing reads by key.
WATCHED_TABLES = ("jobs", "effects", "events", "invoices")
CHECK_EVERY_SECONDS = 5.0
# Analyze once this many rows changed since the last ANALYZE, and at least this share of them.
MIN_CHANGED_ROWS = 1000
MIN_CHANGED_SHARE = 0.5

_STALE = (
    "SELECT relname FROM pg_stat_user_tables "
    "WHERE schemaname = current_schema() AND relname = ANY(%(tables)s) "
    "AND n_mod_since_analyze >= %(rows)s "
    "AND n_mod_since_analyze >= %(share)s * n_live_tup"
)


class PlannerStatistics:
    """Keeps column statistics current on PostgreSQL; does nothing on SQLite."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next_check = 0.0

    def refresh(self, connection: Connection) -> list[str]:
        """ANALYZE the watched tables whose statistics are stale; returns their names.

        Runs outside any transaction of the caller's: ANALYZE holds a lock on the table until
        its transaction ends. A table another session is analyzing is skipped.
        """
        if connection.dialect.name != "postgresql":
            return []
        now = self._clock()
        if now < self._next_check:
            return []
        self._next_check = now + CHECK_EVERY_SECONDS
        with connection.begin():
            stale = list(
                connection.exec_driver_sql(
                    _STALE,
                    {
                        "tables": list(WATCHED_TABLES),
                        "rows": MIN_CHANGED_ROWS,
                        "share": MIN_CHANGED_SHARE,
                    },
                ).scalars()
            )
            for table in stale:
                # A role that does not own the table gets a warning and no statistics: then
                # only autovacuum's remain, as before.
                connection.exec_driver_sql(f'ANALYZE (SKIP_LOCKED) "{table}"')
        if stale:
            log.info("planner_statistics_refreshed", tables=stale)
        return stale
