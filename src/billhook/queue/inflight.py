"""`InFlight`: the jobs a worker holds, from their claim until their outcome is recorded.

While a job is in flight its lease is heartbeated and shutdown waits for it; what is still in
flight at the end of the grace period is released. A job is *finishing* once its handler has
returned: its lease may end at any moment, so a heartbeat that misses it is no lease lost. It is
*completing* while its completion waits for the fetcher's next round: that round, not the
executor that ran it, takes it out.

Shared by the fetcher, the executors, the heartbeat and `join`, so every method takes the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from billhook.queue.jobs import Job


class InFlight:
    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._finishing: set[int] = set()
        self._completing: set[int] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._jobs)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def mark_finishing(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                self._finishing.add(job.id)

    def mark_completing(self, job: Job) -> None:
        with self._lock:
            self._completing.add(job.id)

    def still_running(self, ids: set[int]) -> set[int]:
        """Those of `ids` still in flight whose handler has not returned."""
        with self._lock:
            return ids & (set(self._jobs) - self._finishing)

    def settle_round(self, done: Sequence[Job], claimed: Sequence[Job]) -> None:
        """A fetch round committed: the jobs it completed leave, the jobs it claimed enter."""
        with self._changed:
            for job in done:
                self._completing.discard(job.id)
                self._finishing.discard(job.id)
                self._jobs.pop(job.id, None)
            for job in claimed:
                self._jobs[job.id] = job
            self._changed.notify_all()

    def settle_executed(self, batch: Sequence[Job]) -> None:
        """An executor ran `batch`: its jobs leave, but those whose completion waits for a round."""
        with self._changed:
            for job in batch:
                if job.id in self._completing:
                    continue  # the fetcher's round settles it
                self._jobs.pop(job.id, None)
                self._finishing.discard(job.id)
            self._changed.notify_all()

    def wait_empty(self, deadline: float) -> None:
        """Until nothing is in flight or `time.monotonic()` reaches `deadline`."""
        with self._changed:
            while self._jobs and time.monotonic() < deadline:
                self._changed.wait(timeout=min(0.1, max(deadline - time.monotonic(), 0)))
