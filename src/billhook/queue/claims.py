"""Moving jobs between states: claim, heartbeat, complete, fail, rescue, release.

Every transition after the claim is guarded by (id, state running, worker_id, attempts): a worker
whose lease was rescued and whose job was claimed again elsewhere cannot complete or fail the
new attempt. Handlers therefore run at least once and must be idempotent (processing checks
the event's `outcome` in its own transaction).

Claiming, per ordering key: a job is claimable when its `run_at` has come, the queue is not
paused, no job of its key is running and no unfinished job of its key comes before it in
provider order `(order_ts, id)`. Dead jobs are finished: they do not block their key.
Claims walk waiting jobs in provider order (partial index `ix_jobs_claimable`): the first
waiting job met of each key is that key's head, so claimable jobs are found after few
blocked ones (a single key with a deep backlog at the front is the slow case).
"""

from __future__ import annotations

import functools
import random
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.queue.jobs import Job, notify_enqueued
from billhook.queue.retry import RetryPolicy, is_last_attempt, next_run_at
from billhook.queue.states import CLAIMABLE, JobState
from billhook.store.batch_writes import SQLITE_HELD, held_pairs
from billhook.store.engine import transaction
from billhook.store.schema import job_attempts, jobs, settings

DeadHook = Callable[[Connection, Job], None]
"""Called in the transaction that marks a job dead, with the dead job (its `last_error` set)."""

PAUSED_KEY = "paused"
MAX_ERROR_CHARS = 4000


def claim(
    engine: Engine, *, worker_id: str, now: float, lease_seconds: float, limit: int = 1
) -> list[Job]:
    """Take up to `limit` claimable jobs under a lease; [] when none (or a key race was lost)."""
    try:
        with transaction(engine) as connection:
            return claim_in(
                connection, worker_id=worker_id, now=now, lease_seconds=lease_seconds, limit=limit
            )
    except sa.exc.IntegrityError:
        # Another worker started a job of the same key after our snapshot; the unique index on
        # running keys refused ours. Nothing is lost: the job is still claimable later.
        return []


def claim_in(
    connection: Connection, *, worker_id: str, now: float, lease_seconds: float, limit: int
) -> list[Job]:
    """`claim` inside the caller's transaction (the worker completes finished jobs and claims
    new ones in one commit). Raises `IntegrityError` when a key race was lost: the caller
    rolls back."""
    statement = _claim_statement(connection.dialect.name == "postgresql")
    params = {
        "b_now": now,
        "b_limit": limit,
        "b_worker_id": worker_id,
        "b_lease": now + lease_seconds,
    }
    rows = connection.execute(statement, params).mappings().all()
    return sorted((Job.from_row(row) for row in rows), key=lambda job: (job.order_ts, job.id))


@functools.cache
def _claim_statement(skip_locked: bool) -> sa.Update:
    # Built once: constructing this statement costs more CPU than running it.
    candidates = _claimable(skip_locked=skip_locked).cte("c")
    return (
        jobs.update()
        .where(jobs.c.id.in_(sa.select(candidates.c.id)))
        .values(
            state=JobState.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            worker_id=sa.bindparam("b_worker_id", type_=sa.String()),
            started_at=sa.bindparam("b_now", type_=sa.Double()),
            lease_expires_at=sa.bindparam("b_lease", type_=sa.Double()),
        )
        .returning(*jobs.c)
    )


def _claimable(*, skip_locked: bool) -> sa.Select[tuple[int]]:
    job = jobs.alias("j")
    other = jobs.alias("o")
    waiter = jobs.alias("w")
    waiting: list[sa.ColumnClause[str]] = [
        sa.literal_column(f"'{state.value}'", sa.String()) for state in CLAIMABLE
    ]
    # Two tests, each answered by its own partial index: a running job of the key
    # (`uq_jobs_running_key`), an earlier waiting job of the key (`ix_jobs_waiting_key`).
    running = sa.exists().where(
        other.c.ordering_key == job.c.ordering_key,
        other.c.state == sa.literal_column(f"'{JobState.RUNNING.value}'"),
    )
    earlier = sa.exists().where(
        waiter.c.ordering_key == job.c.ordering_key,
        waiter.c.state.in_(waiting),
        sa.tuple_(waiter.c.order_ts, waiter.c.id) < sa.tuple_(job.c.order_ts, job.c.id),
    )
    paused = sa.exists().where(settings.c.key == PAUSED_KEY, settings.c.value == "true")
    query = (
        sa.select(job.c.id)
        .where(
            # Literal states, so the planner can use the partial index `ix_jobs_claimable` even
            # with a generic plan for a prepared statement.
            job.c.state.in_(waiting),
            job.c.run_at <= sa.bindparam("b_now", type_=sa.Double()),
            ~running,
            ~earlier,
            ~paused,
        )
        .order_by(job.c.order_ts, job.c.id)
        .limit(sa.bindparam("b_limit", type_=sa.Integer()))
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True, of=job)
    return query


def _held(job: Job) -> sa.ColumnElement[bool]:
    return sa.and_(
        jobs.c.id == job.id,
        jobs.c.state == JobState.RUNNING.value,
        jobs.c.worker_id == job.worker_id,
        jobs.c.attempts == job.attempts,
    )


def heartbeat(
    engine: Engine, *, worker_id: str, job_ids: Iterable[int], now: float, lease_seconds: float
) -> set[int]:
    """Extend the leases this worker still holds; returns the ids it still holds."""
    ids = list(job_ids)
    if not ids:
        return set()
    with transaction(engine) as connection:
        rows = connection.execute(
            jobs.update()
            .where(
                jobs.c.id.in_(ids),
                jobs.c.state == JobState.RUNNING.value,
                jobs.c.worker_id == worker_id,
            )
            .values(lease_expires_at=now + lease_seconds)
            .returning(jobs.c.id)
        ).all()
    return {int(row[0]) for row in rows}


def complete(engine: Engine, job: Job, *, now: float) -> bool:
    """Mark the attempt done; False when this worker no longer held the job."""
    with transaction(engine) as connection:
        updated = connection.execute(
            jobs.update()
            .where(_held(job))
            .values(
                state=JobState.COMPLETED.value,
                finished_at=now,
                lease_expires_at=None,
            )
        ).rowcount
        if updated:
            _record_attempt(connection, job, now=now, outcome="completed")
    return bool(updated)


def complete_many(engine: Engine, done: Sequence[Job], *, now: float) -> set[int]:
    """Mark several attempts done in one transaction (group commit); returns the ids this
    worker still held, and so completed."""
    if not done:
        return set()
    with transaction(engine) as connection:
        return complete_many_in(connection, done, now=now)


def complete_many_in(connection: Connection, done: Sequence[Job], *, now: float) -> set[int]:
    """`complete_many` inside the caller's transaction (the worker commits a batch's work and
    its completions together)."""
    if not done:
        return set()
    by_worker: dict[str | None, list[Job]] = {}
    for job in done:
        by_worker.setdefault(job.worker_id, []).append(job)
    completed: set[int] = set()
    if connection.dialect.name == "postgresql":
        # One statement per worker: the update and the attempt rows in one round trip.
        for worker_id, held in by_worker.items():
            rows = connection.execute(
                _complete_and_record_statement(),
                {
                    "b_worker_id": worker_id,
                    "b_now": now,
                    "b_held": [(job.id, job.attempts) for job in held],
                },
            ).all()
            completed.update(int(row[0]) for row in rows)
        return completed
    # SQLite: fixed driver SQL, the held jobs as one JSON parameter, and the attempt rows a plain
    # executemany of tuples.
    for worker_id, held in by_worker.items():
        pairs = held_pairs((job.id, job.attempts) for job in held)
        rows = connection.exec_driver_sql(_COMPLETE_SQLITE, (now, worker_id, pairs)).all()
        completed.update(int(row[0]) for row in rows)
    attempts = [
        (
            job.id,
            job.attempts,
            job.worker_id,
            job.started_at if job.started_at is not None else now,
            now,
        )
        for job in done
        if job.id in completed
    ]
    if attempts:
        connection.exec_driver_sql(_RECORD_COMPLETED_SQLITE, attempts)
    return completed


_COMPLETE_SQLITE = (
    f"UPDATE {jobs.name} SET state = '{JobState.COMPLETED.value}', finished_at = ?, "
    f"lease_expires_at = NULL WHERE state = '{JobState.RUNNING.value}' AND worker_id = ? "
    f"AND {SQLITE_HELD} RETURNING id"
)
_RECORD_COMPLETED_SQLITE = (
    f"INSERT INTO {job_attempts.name} (job_id, attempt, worker_id, started_at, finished_at, "
    "outcome) VALUES (?, ?, ?, ?, ?, 'completed')"
)


@functools.cache
def _complete_statement() -> sa.Update:
    return (
        jobs.update()
        .where(
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.worker_id == sa.bindparam("b_worker_id", type_=sa.String()),
            sa.tuple_(jobs.c.id, jobs.c.attempts).in_(sa.bindparam("b_held", expanding=True)),
        )
        .values(
            state=JobState.COMPLETED.value,
            finished_at=sa.bindparam("b_now", type_=sa.Double()),
            lease_expires_at=None,
        )
        .returning(jobs.c.id)
    )


@functools.cache
def _complete_and_record_statement() -> sa.Select[int]:
    # PostgreSQL only (SQLite has no data-modifying CTEs): the completion and its attempt rows.
    done = (
        _complete_statement()
        .returning(jobs.c.attempts, jobs.c.worker_id, jobs.c.started_at)
        .cte("done")
    )
    now: sa.BindParameter[float] = sa.bindparam("b_now", type_=sa.Double())
    recorded = job_attempts.insert().from_select(
        ["job_id", "attempt", "worker_id", "started_at", "finished_at", "outcome"],
        sa.select(
            done.c.id,
            done.c.attempts,
            done.c.worker_id,
            sa.func.coalesce(done.c.started_at, now),
            now,
            sa.literal("completed"),
        ),
    ).cte("recorded")
    return sa.select(done.c.id).add_cte(recorded)


def fail(
    engine: Engine,
    job: Job,
    error: BaseException,
    *,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
    dead_hooks: Mapping[str, DeadHook],
) -> JobState | None:
    """Record the failed attempt; retryable with backoff, or dead after the last attempt.

    Returns the new state, or None when this worker no longer held the job.
    """
    message = _error_text(error)
    with transaction(engine) as connection:
        if is_last_attempt(job.attempts, job.max_attempts):
            state = JobState.DEAD
            values: dict[str, object] = {"finished_at": now}
        else:
            state = JobState.RETRYABLE
            run_at = next_run_at(
                now, job.attempts, policy.base_seconds, policy.max_seconds, rng
            )
            values = {"run_at": run_at}
        updated = connection.execute(
            jobs.update()
            .where(_held(job))
            .values(state=state.value, last_error=message, lease_expires_at=None, **values)
        ).rowcount
        if not updated:
            return None
        _record_attempt(
            connection,
            job,
            now=now,
            outcome="failed",
            error_type=_qualified_name(error),
            error_message=str(error)[:MAX_ERROR_CHARS],
            trace="".join(traceback.format_exception(error)),
        )
        if state is JobState.DEAD:
            _run_dead_hook(connection, job.id, dead_hooks)
    return state


def rescue_expired(
    engine: Engine, *, now: float, dead_hooks: Mapping[str, DeadHook], limit: int = 100
) -> list[Job]:
    """Jobs whose worker stopped heartbeating: retry them now, or dead on their last attempt.

    Returns the rescued jobs as they were (running, with the lost worker's id).
    """
    query = (
        sa.select(jobs)
        .where(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now)
        .order_by(jobs.c.lease_expires_at)
        .limit(limit)
    )
    if engine.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    with transaction(engine) as connection:
        expired = [Job.from_row(row) for row in connection.execute(query).mappings()]
        for job in expired:
            message = (
                f"LeaseExpired: worker {job.worker_id} stopped heartbeating during attempt "
                f"{job.attempts} (killed or stalled); lease ended at {job.lease_expires_at}"
            )
            last = is_last_attempt(job.attempts, job.max_attempts)
            connection.execute(
                jobs.update()
                .where(_held(job))
                .values(
                    state=(JobState.DEAD if last else JobState.RETRYABLE).value,
                    run_at=now,
                    finished_at=now if last else None,
                    lease_expires_at=None,
                    last_error=message,
                )
            )
            _record_attempt(
                connection, job, now=now, outcome="rescued",
                error_type="LeaseExpired", error_message=message,
            )
            if last:
                _run_dead_hook(connection, job.id, dead_hooks)
        if expired:
            notify_enqueued(connection)
    return expired


def release(engine: Engine, held: Sequence[Job], *, now: float) -> int:
    """Give back jobs this worker holds but will not finish (shutdown): available again, and
    the attempt is not counted against the job's budget."""
    released = 0
    with transaction(engine) as connection:
        for job in held:
            updated = connection.execute(
                jobs.update()
                .where(_held(job))
                .values(
                    state=JobState.AVAILABLE.value,
                    attempts=jobs.c.attempts - 1,
                    run_at=now,
                    lease_expires_at=None,
                    worker_id=None,
                )
            ).rowcount
            if updated:
                released += 1
                _record_attempt(connection, job, now=now, outcome="released")
        if released:
            notify_enqueued(connection)
    return released


def _run_dead_hook(connection: Connection, job_id: int, hooks: Mapping[str, DeadHook]) -> None:
    row = connection.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one()
    dead = Job.from_row(row)
    hook = hooks.get(dead.kind)
    if hook is not None:
        hook(connection, dead)


def _record_attempt(
    connection: Connection,
    job: Job,
    *,
    now: float,
    outcome: str,
    error_type: str | None = None,
    error_message: str | None = None,
    trace: str | None = None,
) -> None:
    connection.execute(
        job_attempts.insert().values(
            **_attempt_row(
                job,
                now=now,
                outcome=outcome,
                error_type=error_type,
                error_message=error_message,
                trace=trace,
            )
        )
    )


def _attempt_row(
    job: Job,
    *,
    now: float,
    outcome: str,
    error_type: str | None = None,
    error_message: str | None = None,
    trace: str | None = None,
) -> dict[str, object]:
    return {
        "job_id": job.id,
        "attempt": job.attempts,
        "worker_id": job.worker_id,
        "started_at": job.started_at if job.started_at is not None else now,
        "finished_at": now,
        "outcome": outcome,
        "error_type": error_type,
        "error_message": error_message,
        "traceback": trace,
    }


def _qualified_name(error: BaseException) -> str:
    kind = type(error)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _error_text(error: BaseException) -> str:
    return f"{_qualified_name(error)}: {error}"[:MAX_ERROR_CHARS]
