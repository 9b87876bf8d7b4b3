"""The pure billing core: canonical events, the invoice model, effect intents. No I/O, no clock.

Modules: `events` (BillingEvent, parse_event), `state` (InvoiceState: facts and their join),
`invoice` (apply, summarize, needs_attention), `intents` (EffectIntent and its idempotency
keys), `policy` (the switchable policies). Policies and valid histories: docs/billing.md.
"""

from billhook.billing.events import BillingEvent, EventKind, UnprocessableEvent, parse_event
from billhook.billing.intents import EffectIntent, EffectKind
from billhook.billing.invoice import (
    Applied,
    Change,
    InvoiceState,
    InvoiceStatus,
    apply,
    needs_attention,
    summarize,
)
from billhook.billing.policy import DEFAULT_POLICY, Policy

__all__ = [
    "DEFAULT_POLICY",
    "Applied",
    "BillingEvent",
    "Change",
    "EffectIntent",
    "EffectKind",
    "EventKind",
    "InvoiceState",
    "InvoiceStatus",
    "Policy",
    "UnprocessableEvent",
    "apply",
    "needs_attention",
    "parse_event",
    "summarize",
]
