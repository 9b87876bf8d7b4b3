"""Real worker processes against real databases: drain, SIGKILL, poison, pause, SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.ops.dlq import show_job
from billhook.queue.jobs import enqueue
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import events, job_attempts, jobs

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from queue_handlers import RUNS_DDL  # noqa: E402

Spawn = Callable[..., subprocess.Popen[bytes]]


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLHOOK_")}
    env.update(
        BILLHOOK_DATABASE_URL=url,
        BILLHOOK_LEASE_SECONDS="1",
        BILLHOOK_RETRY_BASE_SECONDS="0.01",
        BILLHOOK_RETRY_MAX_SECONDS="0.05",
        BILLHOOK_POLL_INTERVAL_SECONDS="0.1",
        BILLHOOK_SHUTDOWN_GRACE_SECONDS="5",
        BILLHOOK_LOG_LEVEL="warning",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `billhook worker ...` processes and wait until each is up (its signal handlers
    installed); any still alive at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []

    def _spawn(url: str, handlers: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(started)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "billhook", "worker", "--no-effects",
                 "--handlers", f"queue_handlers:{handlers}", *args],
                env=_env(url, BILLHOOK_LOG_LEVEL="info", **env),
                stderr=sink,
            )
        started.append(process)
        _wait(lambda: b"worker_started" in log.read_bytes() or process.poll() is not None,
              60, f"worker {process.pid} to start")
        assert process.poll() is None, log.read_text()
        return process

    yield _spawn
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "billhook", *args], env=_env(url, **env), capture_output=True,
        timeout=60, check=True,
    )


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(sa.text(sql), params).scalar()


def _prepare(engine: Engine) -> None:
    with transaction(engine) as connection:
        connection.exec_driver_sql(RUNS_DDL[engine.dialect.name])


def _stop(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


@pytest.mark.slow
def test_four_workers_drain_5000_jobs_once_each_in_key_order(
    postgres_url: str, spawn: Spawn
) -> None:
    engine = create_engine(postgres_url)
    _prepare(engine)
    rng = random.Random(3)
    rows = [
        {"kind": "process_event", "ordering_key": f"in_{n % 500}", "order_ts": rng.random(),
         "state": "available", "attempts": 0, "max_attempts": 10, "run_at": 0.0,
         "created_at": time.time()}
        for n in range(5000)
    ]
    # A long lease: this test is about throughput and order, not rescue (a loaded machine can
    # stall a heartbeat past a 1 s lease, and a rescued no-op job would rightly run twice).
    workers = [spawn(postgres_url, "recording", "--concurrency", "4",
                     BILLHOOK_LEASE_SECONDS="60") for _ in range(4)]
    # Enqueued once all four are up: one worker alone can drain the backlog while the others
    # are still starting.
    with transaction(engine) as connection:
        connection.execute(jobs.insert(), rows)
    _wait(lambda: _scalar(engine, "SELECT count(*) FROM jobs WHERE state = 'completed'") == 5000,
          240, "5000 completed jobs")
    assert [_stop(worker) for worker in workers] == [0, 0, 0, 0]
    with engine.connect() as connection:
        runs = connection.execute(sa.text(
            "SELECT r.job_id, j.ordering_key, j.order_ts, r.pid FROM queue_test_runs r "
            "JOIN jobs j ON j.id = r.job_id ORDER BY r.seq")).all()
    assert len(runs) == 5000 and len({run.job_id for run in runs}) == 5000
    assert len({run.pid for run in runs}) == 4  # every process took part
    seen: dict[str, tuple[float, int]] = {}
    for run in runs:
        position = (run.order_ts, run.job_id)
        assert seen.get(run.ordering_key, (-1.0, 0)) < position, f"key {run.ordering_key}"
        seen[run.ordering_key] = position
    engine.dispose()


def test_sigkilled_worker_loses_its_job_to_the_rescuer(database_url: str, spawn: Spawn) -> None:
    engine = create_engine(database_url)
    _prepare(engine)
    with transaction(engine) as connection:
        job_id = enqueue(connection, ordering_key="in_1", order_ts=1.0, now=time.time(),
                         max_attempts=5)
    victim = spawn(database_url, "slow")
    _wait(lambda: _scalar(engine, "SELECT count(*) FROM queue_test_runs") == 1, 30,
          "the slow job to start")
    victim.kill()
    victim.wait()
    rescuer = spawn(database_url, "slow")
    _wait(lambda: _scalar(engine, "SELECT state FROM jobs WHERE id = :id", id=job_id)
          == "completed", 30, "the rescued job to complete")
    assert _stop(rescuer) == 0
    with engine.connect() as connection:
        outcomes = connection.execute(sa.select(job_attempts.c.outcome).where(
            job_attempts.c.job_id == job_id).order_by(job_attempts.c.id)).scalars().all()
    assert outcomes == ["rescued", "completed"]
    engine.dispose()


def test_sigterm_releases_a_job_past_the_grace_and_exits_0(
    database_url: str, spawn: Spawn
) -> None:
    engine = create_engine(database_url)
    _prepare(engine)
    with transaction(engine) as connection:
        job_id = enqueue(connection, ordering_key="in_1", order_ts=1.0, now=time.time(),
                         max_attempts=5)
    worker = spawn(database_url, "slow", BILLHOOK_SHUTDOWN_GRACE_SECONDS="0.3")
    _wait(lambda: _scalar(engine, "SELECT count(*) FROM queue_test_runs") == 1, 30,
          "the slow job to start")
    assert _stop(worker) == 0
    with engine.connect() as connection:
        row = connection.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one()
        outcome = connection.execute(sa.select(job_attempts.c.outcome)).scalar_one()
    assert (row["state"], row["attempts"], outcome) == ("available", 0, "released")
    engine.dispose()


def test_poison_dies_after_max_attempts_and_redrive_runs_it_again(
    database_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    _prepare(engine)
    flag = tmp_path / "poisoned"
    flag.touch()
    with transaction(engine) as connection:
        event_pk = connection.execute(events.insert().values(
            source="stripe", event_id="evt_poison", type="invoice.paid", ordering_key="in_1",
            received_at=time.time(), headers="{}", body=b"{}",
        ).returning(events.c.id)).scalar_one()
        job_id = enqueue(connection, ordering_key="in_1", order_ts=1.0, now=time.time(),
                         max_attempts=4, event_pk=event_pk)
    worker = spawn(database_url, "poison", QUEUE_TEST_POISON_FLAG=str(flag))
    _wait(lambda: _scalar(engine, "SELECT state FROM jobs WHERE id = :id", id=job_id) == "dead",
          30, "the poison job to die")
    assert _scalar(engine, "SELECT count(*) FROM queue_test_runs") == 4
    assert _outcome(engine, event_pk) == "failed"
    (dead,) = orjson.loads(_cli(database_url, "dlq", "list", "--json").stdout)
    assert dead["job_id"] == job_id and dead["event_id"] == "evt_poison"
    assert dead["type"] == "invoice.paid" and dead["attempts"] == 4
    assert "has no data.object.id" in dead["last_error"] and dead["dead_at"] > 0
    assert [a.error_type for a in show_job(engine, job_id).history] == ["ValueError"] * 4
    flag.unlink()
    _cli(database_url, "dlq", "redrive", str(job_id))
    _wait(lambda: _scalar(engine, "SELECT state FROM jobs WHERE id = :id", id=job_id)
          == "completed", 30, "the redriven job to complete")
    # The body is `{}`: processing stores it as ignored (not failed) once the poison is gone.
    outcome = _outcome(engine, event_pk)
    assert outcome in ("processed", "ignored")
    assert orjson.loads(_cli(database_url, "dlq", "list", "--json").stdout) == []
    assert _scalar(engine, "SELECT count(*) FROM audit_log WHERE action = 'dlq.redrive'") == 1
    assert _stop(worker) == 0
    engine.dispose()


def test_pause_survives_a_restart_and_resume_drains(database_url: str, spawn: Spawn) -> None:
    engine = create_engine(database_url)
    _prepare(engine)
    _cli(database_url, "pause")
    worker = spawn(database_url, "recording")
    with transaction(engine) as connection:
        for n in range(20):
            enqueue(connection, ordering_key=f"in_{n % 3}", order_ts=float(n), now=time.time(),
                    max_attempts=5)
    # A paused worker keeps polling; give it several poll intervals to (not) claim anything.
    time.sleep(1.0)
    assert _stop(worker) == 0
    worker = spawn(database_url, "recording")
    time.sleep(1.0)
    status = orjson.loads(_cli(database_url, "status", "--json").stdout)
    assert status["paused"] is True and status["jobs_pending"] == 20
    assert _scalar(engine, "SELECT count(*) FROM queue_test_runs") == 0
    _cli(database_url, "resume")
    _wait(lambda: _scalar(engine, "SELECT count(*) FROM jobs WHERE state = 'completed'") == 20,
          30, "the backlog to drain")
    assert _stop(worker) == 0
    actions = _scalar(engine, "SELECT count(*) FROM audit_log WHERE action IN ('pause', 'resume')")
    assert actions == 2
    engine.dispose()


def _outcome(engine: Engine, event_pk: int) -> object:
    return _scalar(engine, "SELECT outcome FROM event_outcomes WHERE event_pk = :id", id=event_pk)
