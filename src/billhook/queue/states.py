"""The job lifecycle, as documented data (after River's `JobState`).

The database enforces the same set (CHECK `ck_jobs_state`, and `finished_at` is set exactly when
a job is `completed` or `dead`); every transition in `claims` is a guarded `UPDATE ... WHERE
state = ...`, so a stale worker cannot move a job it no longer holds.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    AVAILABLE = "available"
    """Waiting to run. Ingest (or a redrive, or a release at shutdown) puts it here.
    Leaves it: a worker's claim (-> running)."""

    RUNNING = "running"
    """Claimed by one worker under a lease; at most one per ordering key (unique index).
    Leaves it: that worker (-> completed, -> retryable, -> dead; -> available when it shuts
    down before the job ends) or the rescuer once the lease has expired (-> retryable, or
    -> dead when it was the last attempt)."""

    RETRYABLE = "retryable"
    """Failed or rescued, waiting for `run_at` (backoff with jitter). Still blocks later jobs
    of its key. Leaves it: a worker's claim once `run_at` has passed (-> running)."""

    COMPLETED = "completed"
    """Finished well (terminal). Nobody moves it again."""

    DEAD = "dead"
    """Out of attempts (terminal until an operator acts). It no longer blocks its key: later
    jobs of the key run, the death hook flags what it was about. Leaves it: `dlq redrive`
    (-> available with a fresh attempt budget)."""


UNFINISHED = (JobState.AVAILABLE, JobState.RUNNING, JobState.RETRYABLE)
CLAIMABLE = (JobState.AVAILABLE, JobState.RETRYABLE)
FINISHED = (JobState.COMPLETED, JobState.DEAD)
