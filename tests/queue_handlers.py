"""Test-only job handlers, loaded into real worker processes with `--handlers queue_handlers:X`.

Each run is recorded in `queue_test_runs` (created by the tests) so a test can see what ran,
where, and in which order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.processing import handle_process_event, on_job_dead
from billhook.queue.jobs import Job
from billhook.queue.registry import Registry
from billhook.store.engine import transaction

RUNS_DDL = {
    "sqlite": "CREATE TABLE queue_test_runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, at DOUBLE NOT NULL)",
    "postgresql": "CREATE TABLE queue_test_runs (seq BIGSERIAL PRIMARY KEY, "
    "job_id BIGINT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
}


def record(engine: Engine, job: Job) -> None:
    with transaction(engine) as connection:
        connection.execute(
            sa.text(
                "INSERT INTO queue_test_runs (job_id, attempt, pid, at) "
                "VALUES (:job_id, :attempt, :pid, :at)"
            ),
            {"job_id": job.id, "attempt": job.attempts, "pid": os.getpid(), "at": time.time()},
        )


def _slow(engine: Engine, job: Job) -> None:
    """The first attempt records itself and then hangs (until killed or the test's deadline)."""
    record(engine, job)
    if job.attempts == 1:
        time.sleep(float(os.environ.get("QUEUE_TEST_SLOW_SECONDS", "60")))


def _poison_while_flagged(engine: Engine, job: Job) -> None:
    """Fails while the flag file exists (a poison event), processes normally once it is gone."""
    record(engine, job)
    if Path(os.environ["QUEUE_TEST_POISON_FLAG"]).exists():
        raise ValueError(f"invoice.paid event of job {job.id} has no data.object.id")
    handle_process_event(engine, job)


recording = Registry({"process_event": record})
slow = Registry({"process_event": _slow})
poison = Registry({"process_event": _poison_while_flagged}, {"process_event": on_job_dead})
