"""`status`: queue depth and age, dead letters, effect backlog, paused; for CLI and API alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.store.engine import transaction
from billhook.store.schema import deliveries, effects, events, jobs, settings

_PENDING_JOBS = ("available", "retryable")
_PENDING_EFFECTS = ("pending", "sending", "retryable")


@dataclass(frozen=True, slots=True)
class Status:
    events_received: int
    deliveries_received: int
    jobs_pending: int
    jobs_running: int
    jobs_dead: int
    effects_pending: int
    oldest_pending_age_s: float
    paused: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(engine: Engine, *, now: float) -> Status:
    """The counts, read in one transaction so they agree with each other."""
    with transaction(engine) as connection:
        job_counts: dict[str, int] = {
            str(state): int(count)
            for state, count in connection.execute(
                sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
            ).all()
        }
        oldest = connection.execute(
            sa.select(sa.func.min(jobs.c.created_at)).where(jobs.c.state.in_(_PENDING_JOBS))
        ).scalar()
        paused = connection.execute(
            sa.select(settings.c.value).where(settings.c.key == "paused")
        ).scalar()
        return Status(
            events_received=_count(connection, events),
            deliveries_received=_count(connection, deliveries),
            jobs_pending=sum(job_counts.get(state, 0) for state in _PENDING_JOBS),
            jobs_running=job_counts.get("running", 0),
            jobs_dead=job_counts.get("dead", 0),
            effects_pending=int(
                connection.execute(
                    sa.select(sa.func.count())
                    .select_from(effects)
                    .where(effects.c.state.in_(_PENDING_EFFECTS))
                ).scalar_one()
            ),
            oldest_pending_age_s=round(max(0.0, now - oldest), 3) if oldest is not None else 0.0,
            paused=paused == "true",
        )


def _count(connection: sa.Connection, table: sa.Table) -> int:
    return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
