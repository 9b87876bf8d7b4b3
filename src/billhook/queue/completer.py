"""Group commit of job completions: the executors that finish together share one commit.

A no-op job costs a claim (shared by a batch) and a completion; committing each completion on
its own caps a worker at the database's commit rate. An executor hands its finished job here
and waits until the transaction that records it has committed, so "completed" still means
"durably recorded" before the executor takes more work, and before the next job of the key
can be claimed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from sqlalchemy.engine import Engine

from billhook.queue.claims import complete_many
from billhook.queue.jobs import Job

MAX_BATCH = 200


class GroupCompleter:
    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self._clock = clock
        self._pending: list[tuple[Job, Future[bool]]] = []
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name="billhook-completer", daemon=True
        )
        self._thread.start()

    def complete(self, job: Job) -> bool:
        """Record `job` completed; blocks until committed. False when the lease was lost;
        raises what the commit raised (e.g. `StoreUnavailable`)."""
        future: Future[bool] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("completer closed")
            self._pending.append((job, future))
            self._lock.notify()
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending and self._closed:
                    return
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                completed = complete_many(
                    self.engine, [job for job, _ in batch], now=self._clock()
                )
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for job, future in batch:
                future.set_result(job.id in completed)
