"""Queue figures for `billhook status`, the admin API and /metrics, read from the database."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.ops.pause import read_pause_state
from billhook.queue.states import CLAIMABLE, JobState
from billhook.store.schema import jobs


@dataclass(frozen=True)
class QueueStats:
    by_state: dict[str, int]
    oldest_pending_age_s: float | None
    paused: bool

    @property
    def jobs_pending(self) -> int:
        return sum(self.by_state[state.value] for state in CLAIMABLE)

    @property
    def jobs_running(self) -> int:
        return self.by_state[JobState.RUNNING.value]

    @property
    def jobs_dead(self) -> int:
        return self.by_state[JobState.DEAD.value]

    def to_dict(self) -> dict[str, object]:
        return {
            "jobs_pending": self.jobs_pending,
            "jobs_running": self.jobs_running,
            "jobs_dead": self.jobs_dead,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "paused": self.paused,
            "jobs_by_state": dict(self.by_state),
        }


def queue_stats(engine: Engine, *, now: float) -> QueueStats:
    """Counts by state, age of the oldest job waiting to run (available or retryable), pause."""
    with engine.connect() as connection:
        counts = {state.value: 0 for state in JobState}
        for state, count in connection.execute(
            sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        ):
            counts[state] = int(count)
        oldest = connection.execute(
            sa.select(sa.func.min(jobs.c.created_at)).where(
                jobs.c.state.in_([state.value for state in CLAIMABLE])
            )
        ).scalar()
        paused = read_pause_state(connection).paused
    return QueueStats(
        by_state=counts,
        oldest_pending_age_s=None if oldest is None else max(now - float(oldest), 0.0),
        paused=paused,
    )
