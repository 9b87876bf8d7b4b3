"""Queue benchmark: no-op job throughput and pickup latency, billhook beside pgqueuer and
procrastinate on the same PostgreSQL, and billhook on SQLite.

    .venv/bin/python -m bench.queue [--jobs 5000] [--latency-jobs 200] [--processes 2]

For each system, in a fresh database: start `--processes` worker processes and let them come
up idle; then
- throughput: enqueue `--jobs` no-op jobs in one transaction and time until the last is done;
- pickup latency: enqueue `--latency-jobs` jobs one commit at a time (every 5 ms) and measure
  enqueue -> handler start (billhook: `jobs.created_at` -> `started_at`, set at claim; the others:
  the enqueue time carried in the payload -> handler start).
Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from billhook.queue.jobs import Job
from billhook.queue.registry import Registry
from billhook.store.engine import create_engine, transaction
from billhook.store.migrate import upgrade
from billhook.store.schema import jobs

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "BILLHOOK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CONCURRENCY = 10


def _noop(_engine: sa.engine.Engine, _job: Job) -> None:
    return None


registry = Registry({"process_event": _noop})


@dataclass(frozen=True)
class Result:
    system: str
    jobs: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.jobs / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


# -- databases and processes ---------------------------------------------------------------------


@contextmanager
def _pg_database() -> Iterator[str]:
    admin = sa.create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    name = f"billhook_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def _processes(argv: list[str], count: int, env: dict[str, str]) -> Iterator[None]:
    started = [subprocess.Popen(argv, env=env) for _ in range(count)]
    try:
        yield
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLHOOK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- billhook -----------------------------------------------------------------------------------


def bench_billhook(url: str, name: str, n_jobs: int, n_latency: int, processes: int) -> Result:
    engine = create_engine(url)
    upgrade(engine)
    env = _env(
        BILLHOOK_DATABASE_URL=url,
        BILLHOOK_LOG_LEVEL="warning",
        BILLHOOK_WORKER_CONCURRENCY=str(CONCURRENCY),
    )
    argv = [sys.executable, "-m", "billhook", "worker", "--no-effects",
            "--handlers", "bench.queue:registry"]

    def done() -> int:
        with engine.connect() as connection:
            return int(connection.execute(
                sa.select(sa.func.count()).where(jobs.c.state == "completed")).scalar_one())

    with _processes(argv, processes, env):
        _warm_up(engine, done)
        base = done()
        start = time.time()
        rows = [_job_row(f"k{n}", start) for n in range(n_jobs)]
        with transaction(engine) as connection:
            connection.execute(jobs.insert(), rows)
        _wait(lambda: done() == base + n_jobs, 300, f"{name} to drain")
        seconds = time.time() - start
        first_latency_id = _max_id(engine)
        for n in range(n_latency):
            with transaction(engine) as connection:
                connection.execute(jobs.insert(), [_job_row(f"l{n}", time.time())])
            time.sleep(0.005)
        _wait(lambda: done() == base + n_jobs + n_latency, 60, f"{name} latency jobs")
    with engine.connect() as connection:
        latencies = [
            (float(started) - float(created)) * 1000
            for created, started in connection.execute(
                sa.select(jobs.c.created_at, jobs.c.started_at).where(
                    jobs.c.id > first_latency_id))
        ]
    engine.dispose()
    return Result(name, n_jobs, seconds, latencies)


def _warm_up(engine: sa.engine.Engine, done: Callable[[], int]) -> None:
    """One job through every worker path, so start-up time is not counted."""
    with transaction(engine) as connection:
        connection.execute(jobs.insert(), [_job_row("warm", time.time())])
    _wait(lambda: done() >= 1, 120, "workers to start")


def _max_id(engine: sa.engine.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.max(jobs.c.id))).scalar_one())


def _job_row(key: str, now: float) -> dict[str, object]:
    return {"kind": "process_event", "ordering_key": key, "order_ts": now, "state": "available",
            "attempts": 0, "max_attempts": 10, "run_at": now, "created_at": now}


# -- pgqueuer and procrastinate: the same no-op work, driven from child processes ----------------


def bench_foreign(system: str, url: str, n_jobs: int, n_latency: int, processes: int) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        ready = Path(scratch)
        asyncio.run(_install(system, url))
        argv = [sys.executable, "-m", "bench.queue", "--child", system, url, scratch]
        with _processes(argv, processes, _env()):
            _wait(lambda: len(list(ready.glob("ready-*"))) == processes, 120, f"{system} workers")
            start = time.time()
            asyncio.run(_enqueue(system, url, n_jobs))
            _wait(lambda: _pending(system, url) == 0, 300, f"{system} to drain")
            seconds = time.time() - start
            asyncio.run(_trickle(system, url, n_latency))
            _wait(lambda: _pending(system, url) == 0, 60, f"{system} latency jobs")
        latencies = [
            float(line)
            for path in ready.glob("latency-*")
            for line in path.read_text().split()
        ]
    return Result(system, n_jobs, seconds, latencies)


def _pending(system: str, url: str) -> int:
    import psycopg

    query = {
        "pgqueuer": "SELECT count(*) FROM pgqueuer",
        "procrastinate": "SELECT count(*) FROM procrastinate_jobs "
        "WHERE status IN ('todo', 'doing')",
    }[system]
    with psycopg.connect(url) as connection:
        row = connection.execute(query).fetchone()
    return int(row[0]) if row else 0


async def _install(system: str, url: str) -> None:
    if system == "pgqueuer":
        import psycopg
        from pgqueuer import PsycopgDriver
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
            await Queries(PsycopgDriver(connection)).install()
    else:
        app = _procrastinate_app(url, None)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()


async def _enqueue(system: str, url: str, count: int) -> None:
    """Enqueue `count` jobs in one transaction; their stamp 0 means "not a latency sample"."""
    payloads = ["0"] * count
    if system == "pgqueuer":
        import psycopg
        from pgqueuer import PsycopgDriver
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
            await Queries(PsycopgDriver(connection)).enqueue(
                ["noop"] * len(payloads), [p.encode() for p in payloads], [0] * len(payloads)
            )
    else:
        app = _procrastinate_app(url, None)
        async with app.open_async():
            task = app.tasks["noop"]
            await task.batch_defer_async(*[{"t": float(p)} for p in payloads])


async def _trickle(system: str, url: str, count: int) -> None:
    """One commit per job, every 5 ms, on one open connection (as a receiver would)."""
    if system == "pgqueuer":
        import psycopg
        from pgqueuer import PsycopgDriver
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
            queries = Queries(PsycopgDriver(connection))
            for _ in range(count):
                await queries.enqueue("noop", str(time.time()).encode())
                await asyncio.sleep(0.005)
    else:
        app = _procrastinate_app(url, None)
        async with app.open_async():
            task = app.tasks["noop"]
            for _ in range(count):
                await task.defer_async(t=time.time())
                await asyncio.sleep(0.005)


def _procrastinate_app(url: str, latencies: list[float] | None) -> object:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop(t: float) -> None:
        if latencies is not None and t:
            latencies.append((time.time() - t) * 1000)

    return app


def _child(system: str, url: str, scratch: str) -> None:
    """A worker process of pgqueuer or procrastinate; writes its pickup latencies on exit."""
    latencies: list[float] = []
    marker = Path(scratch) / f"ready-{os.getpid()}"
    try:
        asyncio.run(_child_main(system, url, latencies, marker))
    finally:
        (Path(scratch) / f"latency-{os.getpid()}").write_text(
            "\n".join(str(x) for x in latencies)
        )


async def _child_main(system: str, url: str, latencies: list[float], marker: Path) -> None:
    loop = asyncio.get_running_loop()
    if system == "pgqueuer":
        import psycopg
        from pgqueuer import PsycopgDriver, QueueManager
        from pgqueuer.models import Job as PgqJob
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
            manager = QueueManager(Queries(PsycopgDriver(connection)))

            @manager.entrypoint("noop")
            async def noop(job: PgqJob) -> None:
                stamp = float(job.payload or b"0")
                if stamp:
                    latencies.append((time.time() - stamp) * 1000)

            loop.add_signal_handler(signal.SIGTERM, manager.shutdown.set)
            marker.touch()
            await manager.run()
    else:
        app = _procrastinate_app(url, latencies)
        async with app.open_async():  # type: ignore[attr-defined]
            marker.touch()
            await app.run_worker_async(  # type: ignore[attr-defined]
                concurrency=CONCURRENCY, wait=True, delete_jobs="never"
            )


# -- report ---------------------------------------------------------------------------------------


def _table(results: list[Result]) -> str:
    lines = [
        "| system | jobs | seconds | jobs/s | pickup p50 ms | pickup p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.jobs:,} | {r.seconds:.2f} | {r.throughput:,.0f} | "
            f"{r.percentile(0.5):.1f} | {r.percentile(0.99):.1f} |"
        )
    return "\n".join(lines)


def run_queue_bench(jobs: int, latency_jobs: int, quick: bool = False,
                    processes: int = 2) -> dict[str, object]:
    """billhook and pgqueuer on PostgreSQL (procrastinate and SQLite too unless `quick`)."""
    results: list[Result] = []
    with _pg_database() as url:
        results.append(bench_billhook(url, "billhook (PostgreSQL)", jobs, latency_jobs, processes))
    for system in ("pgqueuer",) if quick else ("pgqueuer", "procrastinate"):
        with _pg_database() as url:
            results.append(bench_foreign(system, url, jobs, latency_jobs, processes))
    if not quick:
        with tempfile.TemporaryDirectory() as scratch:
            url = f"sqlite:///{scratch}/bench.db"
            results.append(bench_billhook(url, "billhook (SQLite)", jobs, latency_jobs,
                                          processes))
    by_system = {r.system: r for r in results}
    ours, theirs = by_system["billhook (PostgreSQL)"], by_system["pgqueuer"]
    text = (
        "## Queue: no-op jobs, billhook beside pgqueuer (and procrastinate)\n\n"
        f"{processes} worker processes per system, {CONCURRENCY} concurrent jobs each (pgqueuer: "
        "its defaults), same no-op handler, fresh database per system; throughput = one "
        f"transaction enqueues {jobs:,} jobs, clock stops when the last is done; pickup = enqueue "
        "-> handler start for jobs enqueued one commit every 5 ms.\n\n"
        f"{_table(results)}\n\n- billhook / pgqueuer on the same PostgreSQL: "
        f"{ours.throughput / theirs.throughput:.2f}x (target >= 1.5x)."
    )
    return {
        "queue_jps_postgres": round(ours.throughput, 1),
        "pgqueuer_jps_postgres": round(theirs.throughput, 1),
        "markdown": text,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="Do not append to RESULTS.md.")
    parser.add_argument(
        "--quick", action="store_true",
        help="Only billhook (PostgreSQL) and pgqueuer; implies --no-record.",
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="Run the PostgreSQL pair this many times, alternating which goes first.",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: list[Result] = []
    for round_ in range(args.repeat):
        pair: list[Result] = []
        order = ("billhook", "pgqueuer") if round_ % 2 == 0 else ("pgqueuer", "billhook")
        for system in order:
            with _pg_database() as url:
                if system == "billhook":
                    pair.append(bench_billhook(url, "billhook (PostgreSQL)", args.jobs,
                                               args.latency_jobs, args.processes))
                else:
                    pair.append(bench_foreign(system, url, args.jobs, args.latency_jobs,
                                              args.processes))
        ours = next(r for r in pair if r.system.startswith("billhook"))
        theirs = next(r for r in pair if r.system == "pgqueuer")
        print(f"round {round_ + 1}: billhook {ours.throughput:,.0f} jobs/s, pgqueuer "
              f"{theirs.throughput:,.0f} jobs/s, ratio {ours.throughput / theirs.throughput:.2f}x",
              flush=True)
        results += pair
    if not args.quick:
        with _pg_database() as url:
            results.append(bench_foreign("procrastinate", url, args.jobs, args.latency_jobs,
                                         args.processes))
        with tempfile.TemporaryDirectory() as scratch:
            url = f"sqlite:///{scratch}/bench.db"
            results.append(bench_billhook(url, "billhook (SQLite)", args.jobs,
                                          args.latency_jobs, args.processes))
    table = _table(results)
    print(table)
    if args.quick:
        return
    if args.no_record:
        return
    header = (
        f"\n# Queue benchmark\n\n- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPU, "
        f"Python {platform.python_version()}; load average before the run: "
        f"{', '.join(f'{x:.1f}' for x in load_before)}\n"
        f"- command: `.venv/bin/python -m bench.queue --jobs {args.jobs} "
        f"--latency-jobs {args.latency_jobs} --processes {args.processes}`\n"
        f"- {args.processes} worker processes per system, {CONCURRENCY} concurrent jobs each "
        "(pgqueuer: its defaults), same no-op handler, fresh database per system; "
        "throughput = one transaction enqueues all jobs, clock stops when the last is done; "
        "pickup = enqueue -> handler start for jobs enqueued one commit every 5 ms.\n\n"
    )
    with (ROOT / "bench" / "RESULTS.md").open("a") as results_file:
        results_file.write(header + table + "\n")


if __name__ == "__main__":
    main()
