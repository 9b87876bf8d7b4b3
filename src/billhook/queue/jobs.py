"""The `Job` row as a value, and putting jobs on the queue.

Ingest writes its job row itself, in the transaction that stores the event; `enqueue` is the
same insert for everyone else (tests, replay, benchmarks). On PostgreSQL an insert into `jobs`
fires `NOTIFY billhook_jobs` from a statement trigger (see the initial migration), so waiting
workers wake at commit without anyone having to remember to notify.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from billhook.queue.states import JobState
from billhook.store.schema import jobs

NOTIFY_CHANNEL = "billhook_jobs"
PROCESS_EVENT = "process_event"

# The wake-up events of the workers in this process: whoever enqueues in-process (SQLite, tests)
# wakes them directly instead of letting them sleep until the next poll.
_local_wakeups: weakref.WeakSet[threading.Event] = weakref.WeakSet()


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    event_pk: int | None
    ordering_key: str
    order_ts: float
    state: JobState
    attempts: int
    max_attempts: int
    run_at: float
    lease_expires_at: float | None
    worker_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Job:
        return cls(
            id=int(row["id"]),
            kind=row["kind"],
            event_pk=None if row["event_pk"] is None else int(row["event_pk"]),
            ordering_key=row["ordering_key"],
            order_ts=float(row["order_ts"]),
            state=JobState(row["state"]),
            attempts=int(row["attempts"]),
            max_attempts=int(row["max_attempts"]),
            run_at=float(row["run_at"]),
            lease_expires_at=_opt_float(row["lease_expires_at"]),
            worker_id=row["worker_id"],
            created_at=float(row["created_at"]),
            started_at=_opt_float(row["started_at"]),
            finished_at=_opt_float(row["finished_at"]),
            last_error=row["last_error"],
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def enqueue(
    connection: Connection,
    *,
    ordering_key: str,
    order_ts: float,
    now: float,
    max_attempts: int,
    kind: str = PROCESS_EVENT,
    event_pk: int | None = None,
    run_at: float | None = None,
) -> int:
    """Insert one available job in the caller's transaction; returns its id."""
    job_id = connection.execute(
        jobs.insert()
        .values(
            kind=kind,
            event_pk=event_pk,
            ordering_key=ordering_key,
            order_ts=order_ts,
            state=JobState.AVAILABLE.value,
            attempts=0,
            max_attempts=max_attempts,
            run_at=now if run_at is None else run_at,
            created_at=now,
        )
        .returning(jobs.c.id)
    ).scalar_one()
    return int(job_id)


def notify_enqueued(connection: Connection) -> None:
    """Wake workers on PostgreSQL when this transaction commits (NOTIFY is delivered at commit).

    Inserts already notify through the trigger; call this after making jobs available by an
    UPDATE (redrive, release), which the trigger does not see. On SQLite it does nothing: call
    `wake_local_workers()` after the commit instead.
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")


def wake_local_workers() -> None:
    """Wake the workers of this process now; call it after the enqueueing commit."""
    for event in list(_local_wakeups):
        event.set()


def register_local_wakeup(event: threading.Event) -> None:
    """Have `wake_local_workers` set `event` (held weakly: a stopped worker drops out)."""
    _local_wakeups.add(event)
