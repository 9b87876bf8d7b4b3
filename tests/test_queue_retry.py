"""The backoff policy is a pure function: bounds, growth, cap, jitter spread."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from billhook.queue.retry import backoff_ceiling, is_last_attempt, next_run_at


def test_ceiling_doubles_from_base_up_to_cap() -> None:
    assert [backoff_ceiling(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_ceiling(10_000, 1.0, 3600.0) == 3600.0


@given(
    now=st.floats(0, 2e9),
    attempts=st.integers(1, 200),
    base=st.floats(0.001, 10),
    cap=st.floats(0.001, 7200),
    seed=st.integers(0, 2**32),
)
def test_next_run_is_between_now_and_the_ceiling(
    now: float, attempts: int, base: float, cap: float, seed: int
) -> None:
    run_at = next_run_at(now, attempts, base, cap, random.Random(seed))
    assert now <= run_at <= now + min(cap, base * 2 ** min(attempts - 1, 64)) + 1e-6


def test_full_jitter_spreads_retries() -> None:
    rng = random.Random(7)
    delays = [next_run_at(0.0, 5, 1.0, 3600.0, rng) for _ in range(2000)]
    assert min(delays) < 1.0 and max(delays) > 15.0  # uniform over [0, 16)
    assert abs(sum(delays) / len(delays) - 8.0) < 0.5


def test_last_attempt() -> None:
    assert not is_last_attempt(9, 10)
    assert is_last_attempt(10, 10)
