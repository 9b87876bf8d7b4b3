"""The effect dispatcher: a transactional outbox of emails and downstream webhooks, sent once.

Modules: `outbox` (enqueue intents inside the billing transaction, the backlog count),
`render` (the email: Message-ID, Babel amounts, Jinja2 templates), `mailer` (the mail
hand-over: Maildir, or `smtp`, the SMTP client that pipelines one message a round trip),
`webhook` (signed downstream POST), `dispatcher` (the `EffectDispatcher` service: claim, send,
record, and the ordering that closes the crash window) with its three steps `claim`
(a batch of due rows, each with its `sending` attempt), `handover` (each message to its channel)
and `outcomes` (every outcome of the batch in one commit), `deadletter` (list and redrive dead
effects), `timeline` (each effect of an invoice with its attempts, for explain), `metrics`.
"""

from billhook.effects.deadletter import DeadEffect, list_dead_effects, redrive_effect
from billhook.effects.dispatcher import EffectDispatcher
from billhook.effects.outbox import EffectIntent, effects_backlog, enqueue_effects
from billhook.effects.timeline import EffectAttemptRecord, EffectHistory, effect_timeline

__all__ = [
    "DeadEffect",
    "EffectAttemptRecord",
    "EffectDispatcher",
    "EffectHistory",
    "EffectIntent",
    "effect_timeline",
    "effects_backlog",
    "enqueue_effects",
    "list_dead_effects",
    "redrive_effect",
]
