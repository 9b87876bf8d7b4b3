"""The worker service: claim jobs, run their handlers on N threads, keep leases alive, rescue
what dead workers left behind, and shut down gracefully.

Threads of one worker: a fetcher (on its own held connection, one transaction per round: it
records the jobs the executors finished and claims as many jobs as there are free slots, then
waits for a wake-up: a LISTEN notification on PostgreSQL, an in-process wake-up, a finished job,
or the poll interval), `concurrency` executors, a heartbeat, a rescuer, and one loop per extra
service (anything with `run_once() -> int`, such as the effects dispatcher).
"""

from __future__ import annotations

import os
import queue
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol, runtime_checkable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.config import Settings
from billhook.errors import BillhookError
from billhook.observability import get_logger
from billhook.queue.claims import (
    claim,
    claim_in,
    complete,
    complete_many_in,
    fail,
    heartbeat,
    release,
    rescue_expired,
)
from billhook.queue.completer import GroupCompleter
from billhook.queue.jobs import NOTIFY_CHANNEL, Job, register_local_wakeup
from billhook.queue.registry import Registry
from billhook.queue.retry import RetryPolicy
from billhook.store.engine import transaction

_log = get_logger(__name__)

SQLITE_POLL_SECONDS = 0.05
# Jobs whose handler can run inside a given transaction share one commit, at most this many.
MAX_SHARED_COMMIT = 50
# Jobs held per executor (running, queued for an executor, or waiting for their completion to
# commit): claimed jobs wait in the queue while the previous ones run, so executors do not idle
# through a round trip.
PREFETCH_PER_EXECUTOR = 2
# At most this many jobs claimed in one round.
MAX_CLAIM = 100
# After a failed round, wait this long before the next.
ROUND_RETRY_SECONDS = 1.0


@runtime_checkable
class BatchHandler(Protocol):
    """A handler that can run a batch of jobs inside the worker's transaction (`Processor`).

    `run_many` returns the jobs it refused (with why) having written nothing of theirs, and
    raises when the database refuses: the worker then rolls back and runs each job alone."""

    def run_many(self, connection: Connection, jobs: Sequence[Job]) -> dict[int, Exception]: ...


class Service(Protocol):
    """A background concern of one shape: `run_once()` does a batch and says how much."""

    def run_once(self) -> int: ...


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = 4
    lease_seconds: float = 60.0
    poll_interval_seconds: float = 0.2
    shutdown_grace_seconds: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_settings(cls, settings: Settings, concurrency: int | None = None) -> WorkerConfig:
        return cls(
            concurrency=concurrency or settings.worker_concurrency,
            lease_seconds=settings.lease_seconds,
            poll_interval_seconds=settings.poll_interval_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            retry=RetryPolicy(
                base_seconds=settings.retry_base_seconds,
                max_seconds=settings.retry_max_seconds,
                max_attempts=settings.max_attempts,
            ),
        )


def new_worker_id() -> str:
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    def __init__(
        self,
        engine: Engine,
        config: WorkerConfig,
        registry: Registry,
        *,
        services: Sequence[Service] = (),
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.registry = registry
        self.services = list(services)
        self.worker_id = worker_id or new_worker_id()
        self._clock = clock
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._fetcher_done = threading.Event()
        self._joined = threading.Event()
        self._wake = threading.Event()
        register_local_wakeup(self._wake)
        self._inflight: dict[int, Job] = {}
        self._finishing: set[int] = set()
        # Finished jobs handed to the completer: in flight until their completion commits.
        self._completing: set[int] = set()
        # Batchable jobs (the event processor) share a transaction per executor batch: claim
        # enough that one batch can fill, whatever the concurrency.
        self._capacity = max(
            PREFETCH_PER_EXECUTOR * config.concurrency,
            MAX_SHARED_COMMIT
            if any(isinstance(h, BatchHandler) for h in registry.handlers.values())
            else 0,
        )
        self._connection: Connection | None = None
        self._inflight_lock = threading.Lock()
        self._idle = threading.Condition(self._inflight_lock)
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._completer: GroupCompleter | None = None
        is_pg = engine.dialect.name == "postgresql"
        self._poll = (
            config.poll_interval_seconds
            if is_pg
            else min(config.poll_interval_seconds, SQLITE_POLL_SECONDS)
        )

    # -- one step, for tests and for the loops ------------------------------------------------

    def run_once(self) -> int:
        """Rescue expired leases, claim up to `concurrency` jobs and run them here, in order.

        Returns the number of jobs run.
        """
        self.rescue_once()
        claimed = claim(
            self.engine,
            worker_id=self.worker_id,
            now=self._clock(),
            lease_seconds=self.config.lease_seconds,
            limit=self.config.concurrency,
        )
        self._execute_many(claimed)
        return len(claimed)

    def rescue_once(self) -> int:
        rescued = rescue_expired(
            self.engine, now=self._clock(), dead_hooks=self.registry.dead_hooks
        )
        for job in rescued:
            _log.warning(
                "job_rescued", job_id=job.id, lost_worker=job.worker_id, attempt=job.attempts
            )
        return len(rescued)

    def _execute_many(self, batch: Sequence[Job]) -> None:
        """Run a batch: jobs whose handler can run inside a transaction share one (one commit,
        with their completions); the others run one by one."""
        shared: dict[str, list[Job]] = {}
        for job in batch:
            if len(batch) > 1 and self._batchable(job):
                shared.setdefault(job.kind, []).append(job)
            else:
                self._execute(job)
        for kind, jobs in shared.items():
            handler = self.registry.handlers[kind]
            assert isinstance(handler, BatchHandler)
            for start in range(0, len(jobs), MAX_SHARED_COMMIT):
                self._execute_shared(handler, jobs[start : start + MAX_SHARED_COMMIT])

    def _batchable(self, job: Job) -> bool:
        return isinstance(self.registry.handlers.get(job.kind), BatchHandler)

    def _execute_shared(self, handler: BatchHandler, jobs: Sequence[Job]) -> None:
        """One transaction for the batch; a job the handler refuses fails alone. If the database
        refuses the batch, nothing of it committed: each job then runs on its own."""
        try:
            with transaction(self.engine) as connection:
                failed = handler.run_many(connection, jobs)
                done = [job for job in jobs if job.id not in failed]
                for job in done:
                    self._mark_finishing(job)
                completed = complete_many_in(connection, done, now=self._clock())
        except Exception as exc:
            # Nothing of the batch committed (or the commit's fate is unknown): run each job on
            # its own; handlers are idempotent and a job no longer held is not completed twice.
            _log.warning("shared_commit_failed", jobs=len(jobs), error=repr(exc))
            for job in jobs:
                self._execute(job)
            return
        for job in jobs:
            if job.id in failed:
                self._mark_finishing(job)
                self._record_failure(job, failed[job.id])
            elif job.id not in completed:
                _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)

    def _execute(self, job: Job) -> None:
        try:
            handler = self.registry.handler_for(job.kind)
            handler(self.engine, job)
        except Exception as exc:
            self._mark_finishing(job)
            self._record_failure(job, exc)
            return
        self._mark_finishing(job)
        if self._completer is not None:
            # The fetcher's next round commits it; until then the job stays in flight.
            with self._inflight_lock:
                self._completing.add(job.id)
            self._completer.add(job)
            return
        try:
            done = complete(self.engine, job, now=self._clock())
            if not done:
                _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)
        except Exception as store_error:
            _log.error("job_completion_unrecorded", job_id=job.id, error=str(store_error))

    def _record_failure(self, job: Job, exc: Exception) -> None:
        try:
            state = fail(
                self.engine,
                job,
                exc,
                now=self._clock(),
                policy=self.config.retry,
                rng=self._rng,
                dead_hooks=self.registry.dead_hooks,
            )
        except Exception as store_error:
            # The lease runs out and the rescuer retries it: nothing is lost.
            _log.error("job_fail_unrecorded", job_id=job.id, error=str(store_error))
            return
        log = _log.error if state is not None and state.value == "dead" else _log.warning
        log("job_failed", job_id=job.id, attempt=job.attempts, state=state, error=repr(exc))

    def _mark_finishing(self, job: Job) -> None:
        with self._inflight_lock:
            if job.id in self._inflight:
                self._finishing.add(job.id)

    # -- the threaded service -------------------------------------------------------------------

    def start(self) -> None:
        """Start every thread; returns at once. `stop()` then `join()` to end."""
        targets: list[tuple[str, Callable[[], None]]] = [
            ("fetcher", self._fetch_loop),
            ("heartbeat", self._heartbeat_loop),
            ("rescuer", self._rescue_loop),
        ]
        targets += [(f"executor-{n}", self._executor_loop) for n in range(self.config.concurrency)]
        targets += [
            (f"service-{type(s).__name__}", _bind(self._service_loop, s)) for s in self.services
        ]
        if self.engine.dialect.name == "postgresql":
            targets.append(("listener", self._listen_loop))
        self._completer = GroupCompleter(self._wake.set)
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"billhook-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        _log.info("worker_started", worker_id=self.worker_id, concurrency=self.config.concurrency)

    def stop(self) -> None:
        """Stop claiming (safe to call from a signal handler)."""
        self._stopping.set()
        self._wake.set()

    def join(self) -> int:
        """Let running jobs finish within the grace period, release the rest; returns how many
        were released."""
        deadline = time.monotonic() + self.config.shutdown_grace_seconds
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(timeout=min(0.1, max(deadline - time.monotonic(), 0)))
        # The fetcher commits what is left to complete, then ends; the rest is released.
        self._fetcher_done.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "billhook-fetcher":
                thread.join(timeout=10)
        with self._inflight_lock:
            leftovers = list(self._inflight.values())
        for _ in range(self.config.concurrency):
            self._work.put(None)
        released = release(self.engine, leftovers, now=self._clock()) if leftovers else 0
        self._joined.set()
        for thread in self._threads:
            if thread.name.startswith(
                ("billhook-executor", "billhook-listener", "billhook-fetcher")
            ):
                continue  # a handler past its grace, a blocking LISTEN, already joined
            thread.join(timeout=5)
        _log.info("worker_stopped", worker_id=self.worker_id, released=released)
        return released

    def serve_until_signalled(self) -> int:
        """Run until SIGTERM or SIGINT, then shut down gracefully; returns jobs released."""

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            _log.info("worker_stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        while not self._stopping.wait(timeout=0.5):
            pass
        return self.join()

    def _fetch_loop(self) -> None:
        """Rounds until `join` ends it: each commits the finished jobs and claims for the free
        slots in one transaction. It claims again at once while claims come back full, and
        otherwise waits for a wake-up (a notification, a finished job) or the poll interval."""
        assert self._completer is not None
        wait = False
        try:
            while True:
                if wait:
                    self._wake.wait(timeout=self._poll)
                # Cleared before reading the state: a wake-up after this line is not lost.
                self._wake.clear()
                done = self._completer.take()
                with self._inflight_lock:
                    free = self._capacity - (len(self._inflight) - len(done))
                limit = 0 if self._stopping.is_set() else max(min(free, MAX_CLAIM), 0)
                if not done and not limit:
                    if self._fetcher_done.is_set():
                        return
                    wait = True
                    continue
                claimed = self._round(done, limit)
                if claimed is None:
                    if self._fetcher_done.is_set():
                        return  # the store is down at shutdown: `join` releases the rest
                    self._fetcher_done.wait(timeout=ROUND_RETRY_SECONDS)
                    wait = False
                    continue
                # A short claim means nothing more is claimable now; after a round that only
                # completed, the freed slots are looked at right away.
                wait = limit > 0 and len(claimed) < limit
        finally:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _round(self, done: list[Job], limit: int) -> list[Job] | None:
        """One transaction: complete `done`, claim up to `limit`. None when the store failed
        (`done` is put back for the next round)."""
        assert self._completer is not None
        now = self._clock()
        try:
            if self._connection is None:
                self._connection = self.engine.connect()
            connection = self._connection
            try:
                with connection.begin():
                    completed = complete_many_in(connection, done, now=now)
                    claimed = (
                        claim_in(
                            connection,
                            worker_id=self.worker_id,
                            now=now,
                            lease_seconds=self.config.lease_seconds,
                            limit=limit,
                        )
                        if limit
                        else []
                    )
            except sa.exc.IntegrityError:
                # Another worker started a job of the same key after our snapshot (the unique
                # index on running keys refused ours): the completions alone, claim later.
                with connection.begin():
                    completed = complete_many_in(connection, done, now=now)
                claimed = []
        except sa.exc.SQLAlchemyError as exc:
            _log.warning("claim_failed", error=str(exc).splitlines()[0] if str(exc) else "")
            if self._connection is not None:
                self._connection.invalidate()
                self._connection.close()
                self._connection = None
            self._completer.put_back(done)
            return None
        with self._idle:
            for job in done:
                if job.id not in completed:
                    _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)
                self._completing.discard(job.id)
                self._finishing.discard(job.id)
                self._inflight.pop(job.id, None)
            for job in claimed:
                self._inflight[job.id] = job
            self._idle.notify_all()
        for job in claimed:
            self._work.put(job)
        return claimed

    def _executor_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            # Take what else is already waiting: the batch shares one commit. Only handlers that
            # run inside a transaction gain from it; other jobs stay one per executor, so the
            # executors keep running them in parallel.
            batch = [job]
            stop = False
            shareable = self._batchable(job)
            while shareable and len(batch) < MAX_SHARED_COMMIT:
                try:
                    more = self._work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._execute_many(batch)
            finally:
                with self._idle:
                    for done in batch:
                        if done.id in self._completing:
                            continue  # the fetcher's round settles it
                        self._inflight.pop(done.id, None)
                        self._finishing.discard(done.id)
                    self._idle.notify_all()
                self._wake.set()
            if stop:
                return

    def _heartbeat_loop(self) -> None:
        # Runs until `join` has released the leftovers: leases stay alive through the grace.
        interval = self.config.lease_seconds / 3
        while not self._joined.wait(timeout=interval):
            self._heartbeat_once()

    def _heartbeat_once(self) -> None:
        with self._inflight_lock:
            ids = list(self._inflight)
        if not ids:
            return
        try:
            held = heartbeat(
                self.engine,
                worker_id=self.worker_id,
                job_ids=ids,
                now=self._clock(),
                lease_seconds=self.config.lease_seconds,
            )
        except BillhookError as exc:
            _log.warning("heartbeat_failed", error=str(exc))
            return
        lost = set(ids) - held
        with self._inflight_lock:
            # Jobs finished since `ids` was read are no longer held, and rightly so.
            lost &= set(self._inflight) - self._finishing
        if lost:
            _log.warning("lease_lost", job_ids=sorted(lost))

    def _rescue_loop(self) -> None:
        interval = min(max(self.config.lease_seconds / 2, 0.05), 5.0)
        while not self._stopping.wait(timeout=interval * self._rng.uniform(0.8, 1.2)):
            try:
                self.rescue_once()
            except BillhookError as exc:
                _log.warning("rescue_failed", error=str(exc))

    def _service_loop(self, service: Service) -> None:
        while not self._stopping.is_set():
            try:
                done = service.run_once()
            except Exception as exc:
                _log.error("service_failed", service=type(service).__name__, error=repr(exc))
                done = 0
                self._stopping.wait(timeout=1.0)
            if not done:
                self._stopping.wait(timeout=self._poll)

    def _listen_loop(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._wake.set()  # jobs enqueued while we were not listening
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except psycopg.Error as exc:
                _log.warning("listen_failed", error=str(exc))
                self._stopping.wait(timeout=1.0)


def _bind(method: Callable[[Service], None], service: Service) -> Callable[[], None]:
    return lambda: method(service)
