"""`Fetcher`: a worker's fetch rounds, on one connection it holds for its whole life.

A round is one transaction: it records the completions waiting in the `GroupCompleter` (jobs the
executors finished) and claims as many jobs as there are free slots, so a finished job and the
next claim share one commit. Claimed jobs go on the executors' work queue. The fetcher claims
again at once while claims come back full, and otherwise waits for a wake-up (a LISTEN
notification on PostgreSQL, an in-process enqueue, a finished job) or the poll interval.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.observability import get_logger
from billhook.queue.claims import claim_in, complete_many_in
from billhook.queue.completer import GroupCompleter
from billhook.queue.inflight import InFlight
from billhook.queue.jobs import Job
from billhook.store.planner_statistics import PlannerStatistics

_log = get_logger(__name__)

# At most this many jobs claimed in one round.
MAX_CLAIM = 100
# After a failed round, wait this long before the next.
ROUND_RETRY_SECONDS = 1.0


class Fetcher:
    def __init__(
        self,
        engine: Engine,
        *,
        worker_id: str,
        lease_seconds: float,
        capacity: int,
        poll_seconds: float,
        clock: Callable[[], float],
        inflight: InFlight,
        completer: GroupCompleter,
        work: queue.SimpleQueue[Job | None],
        wake: threading.Event,
        stopping: threading.Event,
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._lease = lease_seconds
        # Jobs the worker holds at most (in flight: claimed, running or completing).
        self._capacity = capacity
        self._poll = poll_seconds
        self._clock = clock
        self._inflight = inflight
        self._completer = completer
        self._work = work
        self._wake = wake
        # Set: claim no more (completions are still recorded).
        self._stopping = stopping
        self._finished = threading.Event()
        self._connection: Connection | None = None
        # Claims walk a few jobs only while PostgreSQL knows how many wait (see the module).
        self._statistics = PlannerStatistics()

    def finish(self) -> None:
        """Record what is left to complete, then end `run` (called by the worker's `join`)."""
        self._finished.set()
        self._wake.set()

    def run(self) -> None:
        """Rounds until `finish`; the worker runs it on its own thread."""
        wait = False
        try:
            while True:
                if wait:
                    self._wake.wait(timeout=self._poll)
                # Cleared before reading the state: a wake-up after this line is not lost.
                self._wake.clear()
                done = self._completer.take()
                free = self._capacity - (len(self._inflight) - len(done))
                limit = 0 if self._stopping.is_set() else max(min(free, MAX_CLAIM), 0)
                if not done and not limit:
                    if self._finished.is_set():
                        return
                    wait = True
                    continue
                claimed = self._round(done, limit)
                if claimed is None:
                    if self._finished.is_set():
                        return  # the store is down at shutdown: `join` releases the rest
                    self._finished.wait(timeout=ROUND_RETRY_SECONDS)
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
        now = self._clock()
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            connection = self._connection
            if limit:
                self._statistics.refresh(connection)
            try:
                with connection.begin():
                    completed = complete_many_in(connection, done, now=now)
                    claimed = (
                        claim_in(
                            connection,
                            worker_id=self._worker_id,
                            now=now,
                            lease_seconds=self._lease,
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
        for job in done:
            if job.id not in completed:
                _log.warning("job_lease_lost", job_id=job.id, attempt=job.attempts)
        self._inflight.settle_round(done, claimed)
        for job in claimed:
            self._work.put(job)
        return claimed
