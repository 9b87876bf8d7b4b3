"""The choices the provider leaves open, as settings an owner can change (docs/billing.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """Fixed policies (documented, each with a test) live in `invoice.py`; these are switchable.

    `late_failure_notices`: send a payment-failed notice for a failed attempt learned only after
    the invoice is known to be paid or void. Off by default: the customer has already paid, and
    a "your payment failed" email after the receipt only confuses. On, the set of effects is the
    same whatever the arrival order (useful when a downstream system wants every attempt).
    """

    late_failure_notices: bool = False


DEFAULT_POLICY = Policy()
