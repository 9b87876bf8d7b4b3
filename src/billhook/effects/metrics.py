"""Prometheus counters of the effect dispatcher (default registry, served by `/metrics`)."""

from __future__ import annotations

from prometheus_client import Counter

EFFECTS_SENT = Counter(
    "billhook_effects_sent", "Effects handed over and recorded as sent.", ["channel", "kind"]
)
EFFECTS_FAILED = Counter(
    "billhook_effects_failed",
    "Effect attempts that failed (each attempt counts once; retried or dead).",
    ["channel", "kind"],
)
EFFECTS_DEAD = Counter(
    "billhook_effects_dead",
    "Effects dead-lettered (out of attempts or unsendable).",
    ["channel", "kind"],
)
EFFECTS_RESENT = Counter(
    "billhook_effects_resent",
    "Effects handed over again under the same key after a dispatcher stopped between hand-over "
    "and record (possible duplicate delivery, same Message-ID / Idempotency-Key).",
    ["channel", "kind"],
)
