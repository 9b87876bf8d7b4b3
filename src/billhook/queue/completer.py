"""Group commit of job completions: what the executors finished, waiting for the next round.

A no-op job costs a claim (shared by a batch) and a completion; committing each completion on
its own caps a worker at the database's commit rate. An executor hands its finished job here and
goes on with its next job; the worker's fetcher takes everything waiting and records it in the
same transaction as its next claim (one commit for both). Until that commit a job stays in the
worker's in-flight set: its lease is still heartbeated, shutdown waits for it, and the database
keeps the next job of its key unclaimable (the job is still `running`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from billhook.queue.jobs import Job

MAX_BATCH = 500


class GroupCompleter:
    def __init__(self, on_pending: Callable[[], None]) -> None:
        self._on_pending = on_pending
        self._pending: list[Job] = []
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        """Queue `job` for completion in the next round; wakes the fetcher."""
        with self._lock:
            self._pending.append(job)
        self._on_pending()

    def take(self) -> list[Job]:
        """Everything waiting (at most `MAX_BATCH`), oldest first."""
        with self._lock:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        return batch

    def put_back(self, jobs: Sequence[Job]) -> None:
        """Jobs whose round failed: first in line for the next one."""
        with self._lock:
            self._pending[:0] = jobs
