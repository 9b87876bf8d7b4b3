"""Processing one stored event (placeholder until the billing shell replaces the body).

`handle_process_event(engine, job) -> None` is the `process_event` handler the default queue
registry runs; `on_job_dead(connection, job) -> None` is called in the transaction that marks
such a job dead. Both names and signatures are what the queue relies on.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.errors import NotFound
from billhook.queue.jobs import Job
from billhook.store.engine import transaction
from billhook.store.schema import events

_DONE = ("processed", "ignored")


def handle_process_event(engine: Engine, job: Job) -> None:
    """Mark the job's event processed, once: a rerun after a crash finds it done."""
    if job.event_pk is None:
        return
    with transaction(engine) as connection:
        outcome = connection.execute(
            sa.select(events.c.outcome).where(events.c.id == job.event_pk)
        ).first()
        if outcome is None:
            raise NotFound(f"job {job.id}: event {job.event_pk} is not in the store")
        if outcome[0] in _DONE:
            return
        connection.execute(
            events.update()
            .where(events.c.id == job.event_pk)
            .values(outcome="processed", processed_at=time.time())
        )


def on_job_dead(connection: Connection, job: Job) -> None:
    """A dead job's event is marked failed (the billing shell also flags the invoice)."""
    if job.event_pk is None:
        return
    connection.execute(
        events.update()
        .where(events.c.id == job.event_pk)
        .values(outcome="failed", processed_at=time.time())
    )
