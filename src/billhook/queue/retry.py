"""When a failed job runs again: exponential backoff with full jitter (pure, no clock, no I/O).

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the retries of many
jobs that failed together, so a recovering dependency is not hit by all of them at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 1.0
    max_seconds: float = 3600.0
    max_attempts: int = 10


def backoff_ceiling(attempts: int, base: float, cap: float) -> float:
    """The largest delay after `attempts` failed attempts (1 -> base, 2 -> 2*base, ...)."""
    exponent = max(attempts - 1, 0)
    # Past 2**64 the cap has long won; avoid float overflow on absurd attempt counts.
    if exponent >= 64:
        return cap
    return float(min(cap, base * (2**exponent)))


def next_run_at(
    now: float, attempts: int, base: float, cap: float, rng: random.Random
) -> float:
    """When to run again after the `attempts`-th failed attempt: `now + U(0, ceiling)`."""
    return now + rng.uniform(0.0, backoff_ceiling(attempts, base, cap))


def is_last_attempt(attempts: int, max_attempts: int) -> bool:
    return attempts >= max_attempts
