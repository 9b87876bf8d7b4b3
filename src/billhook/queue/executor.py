"""`Executor`: run claimed jobs through their handlers and record how each one ended.

Jobs whose handler can run inside a given transaction (a `BatchHandler`, such as the event
processor) share one, up to `MAX_SHARED_COMMIT` of them: their writes and their completions
commit together, and what the handler can do beforehand (`prepare`: reads, the model) is done
before that transaction begins, so it holds the write lock (SQLite) only for the writes.
Other jobs run one by one, each handler in its own transaction(s); a threaded worker hands
their completions to its `GroupCompleter` (the fetcher's next round commits them), otherwise
each commits here. A failure is recorded here either way: retry later, or dead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from sqlalchemy.engine import Connection, Engine

from billhook.observability import get_logger
from billhook.queue.claims import complete, complete_many_in, fail
from billhook.queue.completer import GroupCompleter
from billhook.queue.inflight import InFlight
from billhook.queue.jobs import Job
from billhook.queue.registry import Registry
from billhook.queue.retry import RetryPolicy
from billhook.store.engine import transaction

_log = get_logger(__name__)

# Jobs whose handler can run inside a given transaction share one commit, at most this many.
MAX_SHARED_COMMIT = 50


class PreparedBatch(Protocol):
    """What a `BatchHandler` prepared for a batch of jobs, to run inside a transaction."""

    def run(self, connection: Connection) -> dict[int, Exception]: ...


@runtime_checkable
class BatchHandler(Protocol):
    """A handler that can run a batch of jobs inside the worker's transaction (`Processor`).

    `prepare` runs first, outside any transaction of the worker's (reads and computation that
    need no lock); the prepared batch's `run` returns the jobs it refused (with why) having
    written nothing of theirs, and raises when the database refuses: the worker then rolls
    back and runs each job alone."""

    def prepare(self, engine: Engine, jobs: Sequence[Job]) -> PreparedBatch: ...


class Executor:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        retry: RetryPolicy,
        clock: Callable[[], float],
        rng: random.Random,
        inflight: InFlight,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._retry = retry
        self._clock = clock
        self._rng = rng
        self._inflight = inflight
        # Once: an isinstance test against a runtime-checkable Protocol inspects the handler's
        # attributes every time (4.9 us), and `batchable` is asked once or twice per job.
        self._batch_kinds = frozenset(
            kind for kind, handler in registry.handlers.items() if isinstance(handler, BatchHandler)
        )
        # Set by the worker when it starts its fetcher; until then each completion commits here.
        self.completer: GroupCompleter | None = None

    def batchable(self, job: Job) -> bool:
        return job.kind in self._batch_kinds

    def run(self, batch: Sequence[Job]) -> None:
        """Run a batch: jobs whose handler can run inside a transaction share one (one commit,
        with their completions); the others run one by one."""
        shared: dict[str, list[Job]] = {}
        for job in batch:
            if len(batch) > 1 and self.batchable(job):
                shared.setdefault(job.kind, []).append(job)
            else:
                self._run_one(job)
        for kind, jobs in shared.items():
            handler = self._registry.handlers[kind]
            assert isinstance(handler, BatchHandler)
            for start in range(0, len(jobs), MAX_SHARED_COMMIT):
                self._run_shared(handler, jobs[start : start + MAX_SHARED_COMMIT])

    def _run_shared(self, handler: BatchHandler, jobs: Sequence[Job]) -> None:
        """One transaction for the batch; a job the handler refuses fails alone. If the database
        refuses the batch, nothing of it committed: each job then runs on its own."""
        try:
            prepared = handler.prepare(self._engine, jobs)
            with transaction(self._engine) as connection:
                failed = prepared.run(connection)
                done = [job for job in jobs if job.id not in failed]
                for job in done:
                    self._inflight.mark_finishing(job)
                completed = complete_many_in(connection, done, now=self._clock())
        except Exception as exc:
            # Nothing of the batch committed (or the commit's fate is unknown): run each job on
            # its own; handlers are idempotent and a job no longer held is not completed twice.
            _log.warning("shared_commit_failed", jobs=len(jobs), error=repr(exc))
            for job in jobs:
                self._run_one(job)
            return
        for job in jobs:
            if job.id in failed:
                self._inflight.mark_finishing(job)
                self._record_failure(job, failed[job.id])
            elif job.id not in completed:
                _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)

    def _run_one(self, job: Job) -> None:
        try:
            handler = self._registry.handler_for(job.kind)
            handler(self._engine, job)
        except Exception as exc:
            self._inflight.mark_finishing(job)
            self._record_failure(job, exc)
            return
        self._inflight.mark_finishing(job)
        if self.completer is not None:
            # The fetcher's next round commits it; until then the job stays in flight.
            self._inflight.mark_completing(job)
            self.completer.add(job)
            return
        try:
            done = complete(self._engine, job, now=self._clock())
            if not done:
                _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)
        except Exception as store_error:
            _log.error("job_completion_unrecorded", job_id=job.id, error=str(store_error))

    def _record_failure(self, job: Job, exc: Exception) -> None:
        try:
            state = fail(
                self._engine,
                job,
                exc,
                now=self._clock(),
                policy=self._retry,
                rng=self._rng,
                dead_hooks=self._registry.dead_hooks,
            )
        except Exception as store_error:
            # The lease runs out and the rescuer retries it: nothing is lost.
            _log.error("job_fail_unrecorded", job_id=job.id, error=str(store_error))
            return
        log = _log.error if state is not None and state.value == "dead" else _log.warning
        log("job_failed", job_id=job.id, attempt=job.attempts, state=state, error=repr(exc))
