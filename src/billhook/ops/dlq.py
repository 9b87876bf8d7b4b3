"""Dead letters: list them, show one with every attempt, and re-drive them.

A redrive puts a dead job back to `available` with a fresh attempt budget (attempts 0, the
current `max_attempts`); its earlier attempts stay in `job_attempts`. The redriven job runs
after the rest of its key has moved on: billing converges under any order, so that is safe.
Callers (CLI, admin API) record the action in the audit log through `ops.audit.perform`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import InvalidRequest, NotFound
from billhook.queue.jobs import notify_enqueued, wake_local_workers
from billhook.queue.states import JobState
from billhook.store.engine import transaction
from billhook.store.schema import events, job_attempts, jobs

MAX_LIMIT = 1000


@dataclass(frozen=True)
class DeadJob:
    job_id: int
    kind: str
    event_pk: int | None
    event_id: str | None
    type: str | None
    ordering_key: str
    attempts: int
    last_error: str | None
    dead_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AttemptRecord:
    attempt: int
    worker_id: str | None
    started_at: float
    finished_at: float | None
    outcome: str
    error_type: str | None
    error_message: str | None
    traceback: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobDetail:
    """Any job (dead or not) with its attempts, oldest first: what `dlq show` prints."""

    job_id: int
    kind: str
    state: str
    event_pk: int | None
    event_id: str | None
    type: str | None
    ordering_key: str
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: float
    finished_at: float | None
    history: list[AttemptRecord]

    def to_dict(self) -> dict[str, Any]:
        value = asdict(self)
        value["history"] = [attempt.to_dict() for attempt in self.history]
        return value


@dataclass(frozen=True)
class RedriveResult:
    job_ids: list[int]

    @property
    def count(self) -> int:
        return len(self.job_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"redriven": self.count, "job_ids": self.job_ids}


def _joined() -> sa.Select[Any]:
    return sa.select(
        jobs, events.c.event_id, events.c.type.label("event_type")
    ).select_from(jobs.outerjoin(events, events.c.id == jobs.c.event_pk))


def list_dead(
    engine: Engine, *, event_type: str | None = None, limit: int = 100, after_id: int | None = None
) -> list[DeadJob]:
    """Dead jobs, oldest job first; `after_id` continues a page."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    query = _joined().where(jobs.c.state == JobState.DEAD.value).order_by(jobs.c.id).limit(limit)
    if event_type is not None:
        query = query.where(events.c.type == event_type)
    if after_id is not None:
        query = query.where(jobs.c.id > after_id)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [
        DeadJob(
            job_id=int(row["id"]),
            kind=row["kind"],
            event_pk=row["event_pk"],
            event_id=row["event_id"],
            type=row["event_type"],
            ordering_key=row["ordering_key"],
            attempts=int(row["attempts"]),
            last_error=row["last_error"],
            dead_at=float(row["finished_at"]),
        )
        for row in rows
    ]


def show_job(engine: Engine, job_id: int) -> JobDetail:
    with engine.connect() as connection:
        row = connection.execute(_joined().where(jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFound(f"job {job_id} does not exist (see `billhook dlq list`)")
        attempts = connection.execute(
            sa.select(job_attempts)
            .where(job_attempts.c.job_id == job_id)
            .order_by(job_attempts.c.id)
        ).mappings().all()
    return JobDetail(
        job_id=int(row["id"]),
        kind=row["kind"],
        state=row["state"],
        event_pk=row["event_pk"],
        event_id=row["event_id"],
        type=row["event_type"],
        ordering_key=row["ordering_key"],
        attempts=int(row["attempts"]),
        max_attempts=int(row["max_attempts"]),
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        finished_at=None if row["finished_at"] is None else float(row["finished_at"]),
        history=[
            AttemptRecord(
                attempt=int(a["attempt"]),
                worker_id=a["worker_id"],
                started_at=float(a["started_at"]),
                finished_at=None if a["finished_at"] is None else float(a["finished_at"]),
                outcome=a["outcome"],
                error_type=a["error_type"],
                error_message=a["error_message"],
                traceback=a["traceback"],
            )
            for a in attempts
        ],
    )


def redrive(
    engine: Engine,
    *,
    now: float,
    max_attempts: int,
    job_ids: Sequence[int] | None = None,
    event_type: str | None = None,
) -> RedriveResult:
    """Dead -> available with a fresh budget. `job_ids` names jobs (each must be dead); None
    means every dead job, optionally only those whose event has `event_type`."""
    if job_ids is not None and event_type is not None:
        raise InvalidRequest("give job ids or --type, not both")
    with transaction(engine) as connection:
        if job_ids is not None:
            found = dict(
                connection.execute(
                    sa.select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(list(job_ids)))
                ).all()
            )
            for job_id in job_ids:
                if job_id not in found:
                    raise NotFound(f"job {job_id} does not exist (see `billhook dlq list`)")
                if found[job_id] != JobState.DEAD.value:
                    raise InvalidRequest(
                        f"job {job_id} is {found[job_id]}, not dead: only dead jobs are redriven"
                    )
            targets = list(job_ids)
        else:
            query = sa.select(jobs.c.id).where(jobs.c.state == JobState.DEAD.value)
            if event_type is not None:
                query = query.where(
                    jobs.c.event_pk.in_(sa.select(events.c.id).where(events.c.type == event_type))
                )
            targets = [int(row[0]) for row in connection.execute(query.order_by(jobs.c.id))]
        if targets:
            connection.execute(
                jobs.update()
                .where(jobs.c.id.in_(targets), jobs.c.state == JobState.DEAD.value)
                .values(
                    state=JobState.AVAILABLE.value,
                    attempts=0,
                    max_attempts=max_attempts,
                    run_at=now,
                    finished_at=None,
                    lease_expires_at=None,
                    worker_id=None,
                )
            )
            notify_enqueued(connection)
    if targets:
        wake_local_workers()
    return RedriveResult(job_ids=targets)
