"""One conformance suite for the queue, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Connection, Engine

from billhook.errors import InvalidRequest, NotFound
from billhook.ops.dlq import list_dead, redrive, show_job
from billhook.ops.pause import pause_state, set_paused
from billhook.queue.claims import (
    claim,
    complete,
    complete_many,
    fail,
    heartbeat,
    release,
    rescue_expired,
)
from billhook.queue.jobs import Job, enqueue
from billhook.queue.metrics import register_queue_metrics
from billhook.queue.registry import Registry
from billhook.queue.retry import RetryPolicy
from billhook.queue.states import JobState
from billhook.queue.worker import Worker, WorkerConfig
from billhook.store.engine import transaction
from billhook.store.schema import events, job_attempts, jobs

T0 = 1_700_000_000.0
LEASE = 30.0
POLICY = RetryPolicy(base_seconds=1.0, max_seconds=60.0, max_attempts=3)


def _enqueue(engine: Engine, key: str, order_ts: float, *, now: float = T0, max_attempts: int = 3,
             event_pk: int | None = None) -> int:
    with transaction(engine) as connection:
        return enqueue(connection, ordering_key=key, order_ts=order_ts, now=now,
                       max_attempts=max_attempts, event_pk=event_pk)


def _claim(engine: Engine, worker: str = "w1", now: float = T0, limit: int = 10) -> list[Job]:
    return claim(engine, worker_id=worker, now=now, lease_seconds=LEASE, limit=limit)


def _state(engine: Engine, job_id: int) -> str:
    with engine.connect() as connection:
        return str(connection.execute(
            sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one())


def _fail(engine: Engine, job: Job, now: float, error: Exception | None = None,
          hooks: dict[str, Callable[[Connection, Job], None]] | None = None) -> JobState | None:
    return fail(engine, job, error or ValueError("boom"), now=now, policy=POLICY,
                rng=random.Random(1), dead_hooks=hooks or {})


def test_claim_takes_a_lease_and_never_twice(engine: Engine) -> None:
    a = _enqueue(engine, "in_a", 1.0)
    b = _enqueue(engine, "in_b", 1.0)
    claimed = _claim(engine, "w1", limit=1)
    assert [job.id for job in claimed] == [a]
    job = claimed[0]
    assert job.state is JobState.RUNNING and job.attempts == 1 and job.worker_id == "w1"
    assert job.lease_expires_at == pytest.approx(T0 + LEASE)
    assert [job.id for job in _claim(engine, "w2")] == [b]
    assert _claim(engine, "w3") == []


def test_not_before_run_at(engine: Engine) -> None:
    _enqueue(engine, "k", 1.0, now=T0 + 10)
    assert _claim(engine, now=T0) == []
    assert len(_claim(engine, now=T0 + 10)) == 1


def test_per_key_provider_order_and_exclusion(engine: Engine) -> None:
    third = _enqueue(engine, "in_1", 30.0)
    first = _enqueue(engine, "in_1", 10.0)
    second = _enqueue(engine, "in_1", 20.0)
    other = _enqueue(engine, "in_2", 99.0)
    claimed = _claim(engine)
    assert sorted(job.id for job in claimed) == sorted([first, other])
    assert _claim(engine, "w2") == []  # the key is running
    seen = []
    for _ in range(3):
        (job,) = [j for j in claimed if j.ordering_key == "in_1"]
        seen.append(job.id)
        assert complete(engine, job, now=T0)
        claimed = _claim(engine)
    assert seen == [first, second, third]


def test_a_late_earlier_event_waits_for_the_running_one(engine: Engine) -> None:
    later = _enqueue(engine, "in_1", 20.0)
    (running,) = _claim(engine)
    earlier = _enqueue(engine, "in_1", 10.0)
    assert _claim(engine, "w2") == []
    assert complete(engine, running, now=T0)
    assert [job.id for job in _claim(engine, "w2")] == [earlier]
    assert running.id == later


def test_heartbeat_extends_only_held_leases(engine: Engine) -> None:
    _enqueue(engine, "k", 1.0)
    (job,) = _claim(engine, "w1")
    assert heartbeat(engine, worker_id="w2", job_ids=[job.id], now=T0 + 20,
                     lease_seconds=LEASE) == set()
    assert heartbeat(engine, worker_id="w1", job_ids=[job.id], now=T0 + 20,
                     lease_seconds=LEASE) == {job.id}
    assert rescue_expired(engine, now=T0 + LEASE + 1, dead_hooks={}) == []
    assert [j.id for j in rescue_expired(engine, now=T0 + 20 + LEASE + 1, dead_hooks={})] == [
        job.id
    ]


def test_failure_retries_with_backoff_and_keeps_every_error(engine: Engine) -> None:
    job_id = _enqueue(engine, "k", 1.0)
    (job,) = _claim(engine)
    assert _fail(engine, job, T0 + 1, RuntimeError("card network down")) is JobState.RETRYABLE
    with engine.connect() as connection:
        row = connection.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one()
        attempt = connection.execute(sa.select(job_attempts)).mappings().one()
    assert T0 + 1 <= row["run_at"] <= T0 + 1 + POLICY.base_seconds
    assert row["last_error"] == "RuntimeError: card network down"
    assert attempt["outcome"] == "failed" and attempt["error_type"] == "RuntimeError"
    assert "card network down" in attempt["traceback"]
    assert _claim(engine, now=T0 + 1) == [] or row["run_at"] == T0 + 1
    (again,) = _claim(engine, now=T0 + 2)
    assert again.attempts == 2


def test_dead_after_max_attempts_runs_the_hook_and_frees_the_key(engine: Engine) -> None:
    poison = _enqueue(engine, "in_1", 1.0)
    after = _enqueue(engine, "in_1", 2.0)
    flagged: list[tuple[int, str | None]] = []
    hooks = {"process_event": lambda _c, job: flagged.append((job.id, job.last_error))}
    now = T0
    for attempt in range(1, 4):
        (job,) = _claim(engine, now=now)
        assert job.id == poison and job.attempts == attempt
        state = _fail(engine, job, now, ValueError(f"bad {attempt}"), hooks)
        now += 3600
    assert state is JobState.DEAD
    assert flagged == [(poison, "ValueError: bad 3")]
    assert [job.id for job in _claim(engine, now=now)] == [after]
    (dead,) = list_dead(engine)
    assert dead.job_id == poison and dead.attempts == 3 and dead.last_error == "ValueError: bad 3"
    detail = show_job(engine, poison)
    assert [a.outcome for a in detail.history] == ["failed"] * 3
    assert [a.error_message for a in detail.history] == ["bad 1", "bad 2", "bad 3"]


def test_rescue_expired_lease_and_the_old_worker_cannot_finish(engine: Engine) -> None:
    job_id = _enqueue(engine, "k", 1.0)
    (job,) = _claim(engine, "dead-worker")
    (rescued,) = rescue_expired(engine, now=T0 + LEASE + 1, dead_hooks={})
    assert rescued.id == job_id
    assert _state(engine, job_id) == "retryable"
    (again,) = _claim(engine, "w2", now=T0 + LEASE + 1)
    assert again.attempts == 2
    assert not complete(engine, job, now=T0 + LEASE + 2)
    assert _fail(engine, job, T0 + LEASE + 2) is None
    assert complete(engine, again, now=T0 + LEASE + 2)
    assert _state(engine, job_id) == "completed"
    outcomes = [a.outcome for a in show_job(engine, job_id).history]
    assert outcomes == ["rescued", "completed"]


def test_rescue_on_the_last_attempt_is_dead(engine: Engine) -> None:
    job_id = _enqueue(engine, "k", 1.0, max_attempts=1)
    _claim(engine)
    rescue_expired(engine, now=T0 + LEASE + 1, dead_hooks={})
    assert _state(engine, job_id) == "dead"
    assert "LeaseExpired" in (list_dead(engine)[0].last_error or "")


def test_release_gives_back_the_attempt(engine: Engine) -> None:
    job_id = _enqueue(engine, "k", 1.0)
    (job,) = _claim(engine)
    assert release(engine, [job], now=T0 + 1) == 1
    (again,) = _claim(engine, now=T0 + 1)
    assert again.id == job_id and again.attempts == 1


def test_pause_stops_claims_and_survives_in_the_store(engine: Engine) -> None:
    _enqueue(engine, "k", 1.0)
    assert not pause_state(engine).paused
    set_paused(engine, True, now=T0)
    assert pause_state(engine).paused
    assert _claim(engine) == []
    set_paused(engine, False, now=T0 + 1)
    assert len(_claim(engine)) == 1


def test_redrive_gives_a_fresh_budget(engine: Engine) -> None:
    job_id = _enqueue(engine, "k", 1.0, max_attempts=1)
    (job,) = _claim(engine)
    _fail(engine, job, T0)
    with pytest.raises(InvalidRequest):
        redrive(engine, now=T0, max_attempts=5, job_ids=[job_id], event_type="x")
    with pytest.raises(NotFound):
        redrive(engine, now=T0, max_attempts=5, job_ids=[job_id + 100])
    assert redrive(engine, now=T0 + 1, max_attempts=5, job_ids=[job_id]).job_ids == [job_id]
    with pytest.raises(InvalidRequest):
        redrive(engine, now=T0 + 1, max_attempts=5, job_ids=[job_id])  # no longer dead
    (again,) = _claim(engine, now=T0 + 1)
    assert again.attempts == 1 and again.max_attempts == 5
    assert list_dead(engine) == []


def _event(engine: Engine, event_type: str) -> int:
    with transaction(engine) as connection:
        return int(connection.execute(events.insert().values(
            source="stripe", event_id=f"evt_{event_type}", type=event_type, ordering_key="in_1",
            received_at=T0, headers="{}", body=b"{}",
        ).returning(events.c.id)).scalar_one())


def test_worker_run_once_poison_dies_after_exactly_max_attempts(engine: Engine) -> None:
    good = _event(engine, "invoice.paid")
    bad = _event(engine, "invoice.voided")
    _enqueue(engine, "in_good", 1.0, event_pk=good, max_attempts=3)
    poison_id = _enqueue(engine, "in_bad", 1.0, event_pk=bad, max_attempts=3)
    calls: list[int] = []

    def handler(_engine: Engine, job: Job) -> None:
        calls.append(job.id)
        if job.event_pk == bad:
            raise ValueError("invoice.voided without data.object.id")

    clock = [T0]
    worker = Worker(engine, WorkerConfig(concurrency=4, retry=POLICY),
                    Registry({"process_event": handler}), clock=lambda: clock[0])
    for _ in range(6):
        worker.run_once()
        clock[0] += 3600
    assert calls.count(poison_id) == 3
    (dead,) = list_dead(engine, event_type="invoice.voided")
    assert dead.job_id == poison_id and dead.type == "invoice.voided"
    assert dead.event_id == "evt_invoice.voided"
    assert "without data.object.id" in (dead.last_error or "")


def test_unknown_kind_fails_visibly(engine: Engine) -> None:
    with transaction(engine) as connection:
        job_id = enqueue(connection, kind="mystery", ordering_key="k", order_ts=1.0, now=T0,
                         max_attempts=1)
    Worker(engine, WorkerConfig(retry=POLICY), Registry({}), clock=lambda: T0).run_once()
    assert "no handler registered for job kind 'mystery'" in (show_job(engine, job_id).last_error
                                                              or "")


def test_metrics_read_the_queue_from_the_database(engine: Engine) -> None:
    _enqueue(engine, "a", 1.0)
    _enqueue(engine, "b", 1.0)
    (job,) = _claim(engine, limit=1)
    complete(engine, job, now=T0 + 0.02)
    registry = CollectorRegistry()
    register_queue_metrics(registry, engine)
    text = generate_latest(registry).decode()
    assert 'billhook_jobs{state="available"} 1.0' in text
    assert 'billhook_jobs{state="completed"} 1.0' in text
    assert 'billhook_job_attempts_total{outcome="completed"} 1.0' in text
    assert 'billhook_job_duration_seconds_bucket{le="0.025"} 1.0' in text
    assert "billhook_queue_oldest_pending_age_seconds" in text


def test_group_completion_completes_only_what_is_still_held(engine: Engine) -> None:
    ids = [_enqueue(engine, f"k{n}", 1.0) for n in range(3)]
    first, second, third = _claim(engine, "w1")
    rescue_expired(engine, now=T0 + LEASE + 1, dead_hooks={})  # all three lost...
    (again,) = _claim(engine, "w2", now=T0 + LEASE + 1, limit=1)  # ...one runs elsewhere
    assert complete_many(engine, [first, second, third], now=T0 + LEASE + 2) == set()
    assert complete_many(engine, [again], now=T0 + LEASE + 2) == {again.id}
    assert _state(engine, again.id) == "completed"
    assert sorted(ids) == sorted(j.id for j in (first, second, third))
    fresh = _claim(engine, "w3", now=T0 + LEASE + 3)
    assert complete_many(engine, fresh, now=T0 + LEASE + 4) == {j.id for j in fresh}
    assert [a.outcome for a in show_job(engine, fresh[0].id).history] == ["rescued", "completed"]


def test_group_completion_checks_the_attempt_not_only_the_worker(engine: Engine) -> None:
    _enqueue(engine, "k", 1.0)
    (stale,) = _claim(engine, "w1")
    rescue_expired(engine, now=T0 + LEASE + 1, dead_hooks={})
    (again,) = _claim(engine, "w1", now=T0 + LEASE + 1, limit=1)  # same worker, next attempt
    assert (again.id, again.attempts) == (stale.id, stale.attempts + 1)
    assert complete_many(engine, [stale], now=T0 + LEASE + 2) == set()
    assert _state(engine, again.id) == "running"
    assert complete_many(engine, [again], now=T0 + LEASE + 2) == {again.id}
    history = show_job(engine, again.id).history
    assert [(a.outcome, a.attempt) for a in history] == [("rescued", 1), ("completed", 2)]


def test_started_worker_commits_completions_with_its_claims_in_key_order(engine: Engine) -> None:
    # Three keys, four jobs each, enqueued out of provider order: the threaded worker's rounds
    # (complete what finished, claim the next, one transaction) must keep each key's order and
    # never run two jobs of a key at once.
    for n in range(12):
        _enqueue(engine, f"k{n % 3}", float(11 - n))
    running: set[str] = set()
    runs: list[tuple[str, float]] = []
    overlaps: list[str] = []
    lock = threading.Lock()

    def handler(_engine: Engine, job: Job) -> None:
        with lock:
            if job.ordering_key in running:
                overlaps.append(job.ordering_key)
            running.add(job.ordering_key)
        time.sleep(0.002)
        with lock:
            running.discard(job.ordering_key)
            runs.append((job.ordering_key, job.order_ts))

    worker = Worker(engine, WorkerConfig(concurrency=4, poll_interval_seconds=0.05,
                                         retry=POLICY),
                    Registry({"process_event": handler}), clock=lambda: T0 + 1)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                left = connection.execute(sa.select(sa.func.count()).where(
                    jobs.c.state != JobState.COMPLETED.value)).scalar_one()
            if not left:
                break
            time.sleep(0.02)
    finally:
        worker.stop()
        released = worker.join()
    assert released == 0 and not overlaps and len(runs) == 12
    for key in ("k0", "k1", "k2"):
        order = [ts for k, ts in runs if k == key]
        assert order == sorted(order), key
    with engine.connect() as connection:
        outcomes = connection.execute(
            sa.select(job_attempts.c.outcome, sa.func.count()).group_by(job_attempts.c.outcome)
        ).all()
    assert [tuple(row) for row in outcomes] == [("completed", 12)]
