"""`HandOver`: turn a claimed effect into what leaves billhook, and hand it to its channel.

An email is rendered, then given to the mailer (SMTP or Maildir); a webhook is POSTed, signed, to
the user's endpoint. Both raise on failure: the dispatcher records the outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from billhook.config import Settings
from billhook.effects.claim import ClaimedEffect
from billhook.effects.mailer import Mailer, mailer_from_settings
from billhook.effects.render import EffectUnsendable, OutgoingEmail, render_email
from billhook.effects.webhook import WebhookSender, webhook_sender_from_settings


class HandOver:
    def __init__(
        self, settings: Settings, *, clock: Callable[[], float], mailer: Mailer | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._mailer = mailer if mailer is not None else mailer_from_settings(settings)
        self._webhook: WebhookSender | None = webhook_sender_from_settings(settings)

    @property
    def mailer(self) -> Mailer:
        return self._mailer

    def prepare(self, effect: ClaimedEffect) -> OutgoingEmail | None:
        """The email to send (None for a webhook); raises `EffectUnsendable` if it cannot be."""
        if effect.channel == "webhook":
            if self._webhook is None:
                raise EffectUnsendable(
                    f"effect {effect.idempotency_key} is a webhook but BILLHOOK_EFFECT_WEBHOOK_URL "
                    "is not set; set it (and BILLHOOK_EFFECT_WEBHOOK_SECRET) and redrive"
                )
            return None
        return render_email(
            kind=effect.kind,
            idempotency_key=effect.idempotency_key,
            payload=effect.payload,
            recipient=effect.recipient,
            created_at=effect.created_at,
            settings=self._settings,
        )

    def send(self, effect: ClaimedEffect, message: OutgoingEmail | None) -> None:
        """Hand over what `prepare` returned for `effect`."""
        if message is not None:
            self._mailer.send(
                message, sender=self._settings.mail_from, recipient=effect.recipient or ""
            )
            return
        assert self._webhook is not None
        self._webhook.send(
            kind=effect.kind,
            idempotency_key=effect.idempotency_key,
            payload=effect.payload,
            now=self._clock(),
        )

    def close(self) -> None:
        self._mailer.close()
        if self._webhook is not None:
            self._webhook.close()
