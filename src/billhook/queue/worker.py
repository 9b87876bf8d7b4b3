"""The worker service: claim jobs, run their handlers on N threads, keep leases alive, rescue
what dead workers left behind, and shut down gracefully.

Threads of one worker: a fetcher (`Fetcher`: on its own held connection, one transaction per
round: it records the jobs the executors finished and claims as many jobs as there are free
slots, then waits for a wake-up: a LISTEN notification on PostgreSQL, an in-process wake-up, a
finished job, or the poll interval), `concurrency` executors (each runs what the fetcher claimed
through an `Executor`), a heartbeat, a rescuer, and one loop per extra service (anything with
`run_once() -> int`, such as the effects dispatcher). The jobs they share are kept in `InFlight`.
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
from typing import Protocol

from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.errors import BillhookError
from billhook.observability import get_logger
from billhook.queue.claims import claim, heartbeat, release, rescue_expired
from billhook.queue.completer import GroupCompleter
from billhook.queue.executor import MAX_SHARED_COMMIT, BatchHandler, Executor
from billhook.queue.fetcher import Fetcher
from billhook.queue.inflight import InFlight
from billhook.queue.jobs import NOTIFY_CHANNEL, Job, register_local_wakeup
from billhook.queue.registry import Registry
from billhook.queue.retry import RetryPolicy

_log = get_logger(__name__)

SQLITE_POLL_SECONDS = 0.05
# Jobs held per executor (running, queued for an executor, or waiting for their completion to
# commit): claimed jobs wait in the queue while the previous ones run, so executors do not idle
# through a round trip.
PREFETCH_PER_EXECUTOR = 2


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
        self._joined = threading.Event()
        self._wake = threading.Event()
        register_local_wakeup(self._wake)
        self._inflight = InFlight()
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._executor = Executor(
            engine,
            registry,
            retry=config.retry,
            clock=clock,
            rng=self._rng,
            inflight=self._inflight,
        )
        is_pg = engine.dialect.name == "postgresql"
        self._poll = (
            config.poll_interval_seconds
            if is_pg
            else min(config.poll_interval_seconds, SQLITE_POLL_SECONDS)
        )
        # Only a started worker hands completions to it (`start` tells the executor).
        self._completer = GroupCompleter(self._wake.set)
        self._fetcher = Fetcher(
            engine,
            worker_id=self.worker_id,
            lease_seconds=config.lease_seconds,
            # Batchable jobs (the event processor) share a transaction per executor batch:
            # claim enough that one batch can fill, whatever the concurrency.
            capacity=max(
                PREFETCH_PER_EXECUTOR * config.concurrency,
                MAX_SHARED_COMMIT
                if any(isinstance(h, BatchHandler) for h in registry.handlers.values())
                else 0,
            ),
            poll_seconds=self._poll,
            clock=clock,
            inflight=self._inflight,
            completer=self._completer,
            work=self._work,
            wake=self._wake,
            stopping=self._stopping,
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
        self._executor.run(claimed)
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

    # -- the threaded service -------------------------------------------------------------------

    def start(self) -> None:
        """Start every thread; returns at once. `stop()` then `join()` to end."""
        targets: list[tuple[str, Callable[[], None]]] = [
            ("fetcher", self._fetcher.run),
            ("heartbeat", self._heartbeat_loop),
            ("rescuer", self._rescue_loop),
        ]
        targets += [(f"executor-{n}", self._executor_loop) for n in range(self.config.concurrency)]
        targets += [
            (f"service-{type(s).__name__}", _bind(self._service_loop, s)) for s in self.services
        ]
        if self.engine.dialect.name == "postgresql":
            targets.append(("listener", self._listen_loop))
        self._executor.completer = self._completer
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
        self._inflight.wait_empty(time.monotonic() + self.config.shutdown_grace_seconds)
        # The fetcher commits what is left to complete, then ends; the rest is released.
        self._fetcher.finish()
        for thread in self._threads:
            if thread.name == "billhook-fetcher":
                thread.join(timeout=10)
        leftovers = self._inflight.jobs()
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
            shareable = self._executor.batchable(job)
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
                self._executor.run(batch)
            finally:
                self._inflight.settle_executed(batch)
                self._wake.set()
            if stop:
                return

    def _heartbeat_loop(self) -> None:
        # Runs until `join` has released the leftovers: leases stay alive through the grace.
        interval = self.config.lease_seconds / 3
        while not self._joined.wait(timeout=interval):
            self._heartbeat_once()

    def _heartbeat_once(self) -> None:
        ids = self._inflight.ids()
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
        # Jobs finished since `ids` was read are no longer held, and rightly so.
        lost = self._inflight.still_running(set(ids) - held)
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
