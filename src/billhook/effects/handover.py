"""`HandOver`: turn a claimed effect into what leaves billhook, and hand it to its channel.

An email is rendered, then given to the mailer (SMTP or Maildir); a webhook is POSTed, signed, to
the user's endpoint. Each hand-over returns the outcomes it settled, for the dispatcher to record.
Over SMTP a batch's emails are pipelined when the server allows it: an email's verdict comes with
the next email's hand-over (its content goes in the same write as the next envelope), or with
`settle`, so at most one email awaits its outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from billhook.config import Settings
from billhook.effects.claim import ClaimedEffect
from billhook.effects.mailer import Mailer, mailer_from_settings
from billhook.effects.outcomes import Outcome
from billhook.effects.render import EffectUnsendable, OutgoingEmail, render_email
from billhook.effects.smtp import SmtpMailer, Verdict
from billhook.effects.webhook import WebhookSender, webhook_sender_from_settings


class HandOver:
    def __init__(
        self, settings: Settings, *, clock: Callable[[], float], mailer: Mailer | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._mailer = mailer if mailer is not None else mailer_from_settings(settings)
        self._smtp = self._mailer if isinstance(self._mailer, SmtpMailer) else None
        self._webhook: WebhookSender | None = webhook_sender_from_settings(settings)
        # The email handed to `_smtp` whose verdict has not come yet.
        self._awaiting: ClaimedEffect | None = None

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

    def send(self, effect: ClaimedEffect, message: OutgoingEmail | None) -> list[Outcome]:
        """Hand over what `prepare` returned for `effect`; returns the outcomes now known.

        A pipelined email's outcome comes later (with the next email, or `settle`); the outcome
        of the email that awaited one comes now.
        """
        if message is not None and self._smtp is not None:
            return self._pipelined(self._smtp, effect, message)
        done = self.settle()
        try:
            if message is not None:
                self._mailer.send(
                    message, sender=self._settings.mail_from, recipient=effect.recipient or ""
                )
            else:
                assert self._webhook is not None
                self._webhook.send(
                    kind=effect.kind,
                    idempotency_key=effect.idempotency_key,
                    payload=effect.payload,
                    now=self._clock(),
                )
        except Exception as exc:
            return [*done, _failed(effect, exc)]
        return [*done, Outcome(effect, None, permanent=False)]

    def settle(self) -> list[Outcome]:
        """The outcome of the email that awaits one, if any (its content is sent now)."""
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is None or self._smtp is None:
            return []
        return [_outcome(awaiting, verdict) for verdict in self._smtp.settle()]

    def abandon(self) -> None:
        """A batch cut short: the email that awaits an outcome is dropped with its connection,
        nothing of its content sent (its row stays in doubt, as after a crash)."""
        if self._awaiting is not None:
            self._awaiting = None
            self._mailer.close()

    def close(self) -> None:
        self._awaiting = None
        self._mailer.close()
        if self._webhook is not None:
            self._webhook.close()

    def _pipelined(
        self, smtp: SmtpMailer, effect: ClaimedEffect, message: OutgoingEmail
    ) -> list[Outcome]:
        awaiting, self._awaiting = self._awaiting, None
        try:
            verdicts = smtp.hand(
                message, sender=self._settings.mail_from, recipient=effect.recipient or ""
            )
        except Exception as exc:
            # Not an SMTP answer (the mailer returns those): neither email has a verdict.
            smtp.close()
            return [_failed(e, exc) for e in (awaiting, effect) if e is not None]
        done: list[Outcome] = []
        for verdict in verdicts:
            if verdict.message is message:
                done.append(_outcome(effect, verdict))
            else:
                assert awaiting is not None
                done.append(_outcome(awaiting, verdict))
        if all(verdict.message is not message for verdict in verdicts):
            self._awaiting = effect
        return done


def _outcome(effect: ClaimedEffect, verdict: Verdict) -> Outcome:
    if verdict.error is None:
        return Outcome(effect, None, permanent=False)
    return _failed(effect, verdict.error)


def _failed(effect: ClaimedEffect, exc: Exception) -> Outcome:
    return Outcome(effect, f"{type(exc).__name__}: {exc}", permanent=False)
