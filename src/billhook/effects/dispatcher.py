"""`EffectDispatcher`: claim due outbox rows, hand them over (SMTP, Maildir, webhook), record them.

Lifecycle of a row: pending -> sending -> sent, or -> retryable (backoff) -> ... -> dead.
The crash window is closed by ordering, not hope. Per batch, three commits:

1. claim (`claim`): each row of the batch becomes `sending` with a lease, and gets an
   `effect_attempts` row `sending`, in one commit: every attempt of the batch is committed before
   any hand-over;
2. render and hand over every message of the batch, one after the other (one SMTP connection)
   (`handover`); when the server offers PIPELINING, a message's content goes in the same write
   as the next message's envelope and its verdict is read with that envelope's replies, so the
   last message of the batch gets its verdict (`settle`) before anything is recorded;
3. record every outcome of the batch (rows `sent` / `retryable` / `dead`, attempts closed) in
   one commit (`outcomes`).

A batch that takes longer than half the lease (a slow server) records what it has done so far and
renews the lease of the rest, in one commit, before the next hand-over, so a live dispatcher never
loses a row to another.

A dispatcher that dies between 1 and 3 leaves its whole batch `sending`, each row with an open
attempt. Once the lease runs out, the next claim finds those open attempts, knows each message may
already be delivered, closes them, bumps `resends` and sends again under the same Message-ID /
Idempotency-Key (the successful attempt is recorded `resent`). So a crash resends, under the same
key, every message of the batch it interrupted whose outcome was not recorded: those handed over
before the crash (delivered twice) and those after it (delivered once, but counted as resent, since
nothing says they were not handed over). A row reclaimed without an open attempt was never handed
over, so it is a plain retry. Without a crash, each row is handed over exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects.claim import ClaimedEffect, claim_effects
from billhook.effects.handover import HandOver
from billhook.effects.mailer import Mailer
from billhook.effects.outcomes import Outcome, OutcomeRecorder
from billhook.effects.render import EffectUnsendable
from billhook.errors import StoreUnavailable
from billhook.observability import get_logger

DEFAULT_BATCH_SIZE = 200
_log = get_logger("billhook.effects")


class EffectDispatcher:
    """The outbox service: `run_once()` claims and sends one batch; `run_forever()` loops it."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        batch_size: int = DEFAULT_BATCH_SIZE,
        lease_seconds: float | None = None,
        mailer: Mailer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._batch_size = batch_size
        self._lease = lease_seconds if lease_seconds is not None else settings.lease_seconds
        self._handover = HandOver(settings, clock=clock, mailer=mailer)
        self._recorder = OutcomeRecorder(
            engine,
            settings,
            clock=clock,
            rng=rng if rng is not None else random.Random(),
            lease_seconds=self._lease,
        )

    @property
    def mailer(self) -> Mailer:
        return self._handover.mailer

    def run_once(self) -> int:
        """Claim up to one batch of due effects and deliver them; returns how many were claimed."""
        claimed = claim_effects(
            self._engine, self._clock(), limit=self._batch_size, lease_seconds=self._lease
        )
        self._deliver(claimed)
        return len(claimed)

    def run_forever(self, stop: threading.Event) -> None:
        _log.info("effect dispatcher started", mail=self.mailer.description)
        try:
            while not stop.is_set():
                try:
                    claimed = self.run_once()
                except StoreUnavailable as exc:
                    _log.warning("effect dispatcher: store unavailable", error=str(exc))
                    claimed = 0
                except Exception:
                    _log.exception("effect dispatcher: unexpected error; continuing")
                    claimed = 0
                if claimed < self._batch_size:
                    stop.wait(self._settings.poll_interval_seconds)
        finally:
            self.close()
            _log.info("effect dispatcher stopped")

    def close(self) -> None:
        self._handover.close()

    def _deliver(self, claimed: list[ClaimedEffect]) -> None:
        try:
            done = self._hand_over(claimed)
        except BaseException:
            # Cut short (a bug, an interrupt): nothing is recorded, the batch is in doubt as
            # after a crash; an email still waiting for its content is not sent.
            self._handover.abandon()
            raise
        self._recorder.record(done)

    def _hand_over(self, claimed: list[ClaimedEffect]) -> list[Outcome]:
        # Every attempt of the batch was committed with the claim; the outcomes are committed
        # together at the end (or at a checkpoint when the batch is slow).
        done: list[Outcome] = []
        lost: set[int] = set()
        renew_at = self._clock() + self._lease / 2
        for index, effect in enumerate(claimed):
            if effect.id in lost:
                continue
            try:
                message = self._handover.prepare(effect)
            except EffectUnsendable as exc:
                done.append(Outcome(effect, str(exc), permanent=True))
                continue
            if self._clock() >= renew_at:
                # The email waiting for its verdict gets it first: the checkpoint records what
                # is settled and renews the lease of what was not handed over yet.
                done += self._handover.settle()
                rest = [e for e in claimed[index:] if e.id not in lost]
                lost |= self._recorder.checkpoint(done, rest)
                done = []
                renew_at = self._clock() + self._lease / 2
                if effect.id in lost:
                    continue
            done += self._handover.send(effect, message)
        return done + self._handover.settle()
