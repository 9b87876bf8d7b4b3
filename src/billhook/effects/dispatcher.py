"""`EffectDispatcher`: claim due outbox rows, hand them over (SMTP, Maildir, webhook), record them.

Lifecycle of a row: pending -> sending -> sent, or -> retryable (backoff) -> ... -> dead.
The crash window is closed by ordering, not hope. Per batch, three commits:

1. claim: each row of the batch becomes `sending` with a lease, and gets an `effect_attempts`
   row `sending`, in one commit: every attempt of the batch is committed before any hand-over;
2. render and hand over every message of the batch, one after the other (one SMTP connection);
3. record every outcome of the batch (rows `sent` / `retryable` / `dead`, attempts closed) in
   one commit.

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
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.config import Settings
from billhook.effects.mailer import Mailer, mailer_from_settings
from billhook.effects.metrics import EFFECTS_DEAD, EFFECTS_FAILED, EFFECTS_RESENT, EFFECTS_SENT
from billhook.effects.render import EffectUnsendable, OutgoingEmail, render_email
from billhook.effects.webhook import WebhookSender, webhook_sender_from_settings
from billhook.errors import StoreUnavailable
from billhook.observability import get_logger
from billhook.queue.claims import PAUSED_KEY
from billhook.queue.retry import next_run_at
from billhook.store.engine import transaction
from billhook.store.schema import effect_attempts, effects, invoices
from billhook.store.schema import settings as switches

DEFAULT_BATCH_SIZE = 200
_IN_DOUBT_ERROR = (
    "lease expired after the message was handed over (dispatcher stopped?); "
    "delivery unknown, sent again under the same key"
)
_PAUSED = sa.select(switches.c.key).where(
    switches.c.key == PAUSED_KEY, switches.c.value == "true"
)
_log = get_logger("billhook.effects")


# Filled in place while the claim's transaction runs (recipient, attempt numbers), then only
# read: `dataclasses.replace` per row and step cost more than the batch's SQL.
@dataclass(slots=True)
class _Claimed:
    id: int
    idempotency_key: str
    kind: str
    channel: str
    invoice_id: str | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    resends: int
    created_at: float
    recipient: str | None = None
    # Attempts recorded for this row before this claim (numbering continues from here).
    recorded_attempts: int = 0
    # The `sending` attempt opened with the claim.
    attempt_id: int | None = None


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
        self._mailer = mailer if mailer is not None else mailer_from_settings(settings)
        self._webhook: WebhookSender | None = webhook_sender_from_settings(settings)
        self._rng = rng if rng is not None else random.Random()
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def mailer(self) -> Mailer:
        return self._mailer

    def run_once(self) -> int:
        """Claim up to one batch of due effects and deliver them; returns how many were claimed."""
        claimed = self._claim(self._clock())
        self._deliver(claimed)
        return len(claimed)

    def run_forever(self, stop: threading.Event) -> None:
        _log.info("effect dispatcher started", mail=self._mailer.description)
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
        self._mailer.close()
        if self._webhook is not None:
            self._webhook.close()

    # -- claim -------------------------------------------------------------------------------

    def _claim(self, now: float) -> list[_Claimed]:
        with transaction(self._engine) as connection:
            # `billhook pause` holds effects too: an operator pausing mid-incident (a wrong
            # template, a bad deploy) must be able to stop emails, not only state changes.
            if connection.execute(_PAUSED).first() is not None:
                return []
            self._bury_exhausted(connection, now)
            expired = sa.and_(effects.c.state == "sending", effects.c.lease_expires_at <= now)
            rescued = self._claim_where(connection, expired, now, self._batch_size)
            due = sa.and_(effects.c.state.in_(("pending", "retryable")), effects.c.run_at <= now)
            fresh = self._claim_where(connection, due, now, self._batch_size - len(rescued))
            in_doubt = self._close_open_attempts(connection, [e.id for e in rescued], now)
            if in_doubt:
                connection.execute(
                    sa.update(effects)
                    .where(effects.c.id.in_(in_doubt))
                    .values(resends=effects.c.resends + 1)
                )
            for effect in rescued:
                if effect.id in in_doubt:
                    effect.resends += 1
            claimed = rescued + fresh
            self._set_recipients(connection, claimed)
            _set_attempt_counts(connection, claimed)
            self._open_attempts(connection, claimed, now)
        for effect in claimed:
            if effect.id in in_doubt:
                EFFECTS_RESENT.labels(effect.channel, effect.kind).inc()
                _log.warning(
                    "effect in doubt: resending under the same key",
                    effect_id=effect.id,
                    key=effect.idempotency_key,
                )
        return claimed

    def _due_ids(self, condition: sa.ColumnElement[bool], limit: int) -> sa.Select[Any]:
        query = sa.select(effects.c.id).where(condition).order_by(effects.c.run_at).limit(limit)
        if self._postgres:
            query = query.with_for_update(skip_locked=True)
        return query

    def _claim_where(
        self, connection: Connection, condition: sa.ColumnElement[bool], now: float, limit: int
    ) -> list[_Claimed]:
        if limit <= 0:
            return []
        rows = connection.execute(
            sa.update(effects)
            .where(effects.c.id.in_(self._due_ids(condition, limit)))
            .values(
                state="sending",
                attempts=effects.c.attempts + 1,
                lease_expires_at=now + self._lease,
            )
            .returning(
                effects.c.id,
                effects.c.idempotency_key,
                effects.c.kind,
                effects.c.channel,
                effects.c.invoice_id,
                effects.c.payload,
                effects.c.attempts,
                effects.c.max_attempts,
                effects.c.resends,
                effects.c.created_at,
            )
        ).all()
        return sorted(
            (
                _Claimed(
                    id=row.id,
                    idempotency_key=row.idempotency_key,
                    kind=row.kind,
                    channel=row.channel,
                    invoice_id=row.invoice_id,
                    payload=orjson.loads(row.payload),
                    attempts=row.attempts,
                    max_attempts=row.max_attempts,
                    resends=row.resends,
                    created_at=row.created_at,
                )
                for row in rows
            ),
            key=lambda effect: effect.id,
        )

    def _bury_exhausted(self, connection: Connection, now: float) -> None:
        """A lease that ran out on the last attempt: dead-letter instead of looping on a crash."""
        condition = sa.and_(
            effects.c.state == "sending",
            effects.c.lease_expires_at <= now,
            effects.c.attempts >= effects.c.max_attempts,
        )
        rows = connection.execute(
            sa.update(effects)
            .where(effects.c.id.in_(self._due_ids(condition, self._batch_size)))
            .values(
                state="dead",
                lease_expires_at=None,
                last_error=(
                    "the dispatcher stopped during the last attempt (lease expired); the "
                    "message may or may not have been delivered; redrive to send it again "
                    "under the same key"
                ),
            )
            .returning(effects.c.id, effects.c.kind, effects.c.channel)
        ).all()
        self._close_open_attempts(connection, [row.id for row in rows], now)
        for row in rows:
            EFFECTS_DEAD.labels(row.channel, row.kind).inc()

    def _close_open_attempts(
        self, connection: Connection, effect_ids: list[int], now: float
    ) -> set[int]:
        """Close attempts a dead dispatcher left `sending`; returns the effects they belong to."""
        if not effect_ids:
            return set()
        open_attempts = sa.and_(
            effect_attempts.c.effect_id.in_(effect_ids),
            effect_attempts.c.outcome == "sending",
            effect_attempts.c.finished_at.is_(None),
        )
        rows = connection.execute(
            sa.update(effect_attempts)
            .where(open_attempts)
            .values(finished_at=now, error=_IN_DOUBT_ERROR)
            .returning(effect_attempts.c.effect_id)
        ).all()
        return {row.effect_id for row in rows}

    def _set_recipients(self, connection: Connection, claimed: list[_Claimed]) -> None:
        """The intent's email, else the invoice's current one (set it, then redrive)."""
        missing = {
            e.invoice_id
            for e in claimed
            if e.channel == "email" and not e.payload.get("customer_email") and e.invoice_id
        }
        current: dict[str, str | None] = {}
        if missing:
            current = {
                row.id: row.customer_email
                for row in connection.execute(
                    sa.select(invoices.c.id, invoices.c.customer_email).where(
                        invoices.c.id.in_(missing)
                    )
                )
            }
        for e in claimed:
            if e.channel == "email":
                e.recipient = e.payload.get("customer_email") or current.get(e.invoice_id or "")

    def _open_attempts(self, connection: Connection, claimed: list[_Claimed], now: float) -> None:
        """Step 1 of the ordering: a `sending` attempt per claimed row, in the claim's commit."""
        if not claimed:
            return
        # Numbered over the effect's whole history (counted at claim: while the lease is ours no
        # one else adds attempts, and one claim opens one), so a redrive keeps counting up.
        rows = connection.execute(
            _OPEN_ATTEMPT,
            [
                {"effect_id": e.id, "attempt": e.recorded_attempts + 1, "started_at": now}
                for e in claimed
            ],
        ).all()
        for e, row in zip(claimed, rows, strict=True):
            e.attempt_id = row.id

    # -- deliver -----------------------------------------------------------------------------

    def _deliver(self, claimed: list[_Claimed]) -> None:
        # Every attempt of the batch was committed with the claim; the outcomes are committed
        # together at the end (or at a checkpoint when the batch is slow).
        done: list[_Outcome] = []
        lost: set[int] = set()
        renew_at = self._clock() + self._lease / 2
        for index, effect in enumerate(claimed):
            if effect.id in lost:
                continue
            try:
                message = self._prepare(effect)
            except EffectUnsendable as exc:
                done.append(_Outcome(effect, str(exc), permanent=True))
                continue
            if self._clock() >= renew_at:
                lost |= self._checkpoint(done, [e for e in claimed[index:] if e.id not in lost])
                done = []
                renew_at = self._clock() + self._lease / 2
                if effect.id in lost:
                    continue
            try:
                self._hand_over(effect, message)
            except Exception as exc:
                done.append(_Outcome(effect, f"{type(exc).__name__}: {exc}", permanent=False))
                continue
            done.append(_Outcome(effect, None, permanent=False))
        self._record(done)

    def _prepare(self, effect: _Claimed) -> OutgoingEmail | None:
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

    def _hand_over(self, effect: _Claimed, message: OutgoingEmail | None) -> None:
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

    # -- record ------------------------------------------------------------------------------

    def _checkpoint(self, done: list[_Outcome], rest: list[_Claimed]) -> set[int]:
        """A slow batch: commit the outcomes so far and renew the lease of the rest, together.

        Returns the rows of `rest` whose lease was already lost (reclaimed by another dispatcher
        after it ran out): this one must not hand them over.
        """
        now = self._clock()
        with transaction(self._engine) as connection:
            applied = self._apply(connection, done, now)
            renewed = {
                row.id
                for row in connection.execute(
                    _RENEW, {"ours": [_ours(e) for e in rest], "lease": now + self._lease}
                )
            }
        self._observe(done, applied)
        lost = {e.id for e in rest} - renewed
        for effect_id in sorted(lost):
            _log.warning("effect lease lost before hand-over; skipped", effect_id=effect_id)
        return lost

    def _record(self, done: list[_Outcome]) -> None:
        """Step 3 of the ordering: every outcome of the batch in one commit."""
        if not done:
            return
        now = self._clock()
        with transaction(self._engine) as connection:
            applied = self._apply(connection, done, now)
        self._observe(done, applied)

    def _apply(self, connection: Connection, done: list[_Outcome], now: float) -> set[int]:
        """Write the outcomes; returns the ids of the rows that were still ours.

        Attempts are closed either way: a row no longer ours keeps an honest history.
        """
        if not done:
            return set()
        connection.execute(
            _CLOSE_ATTEMPT,
            [
                {
                    "attempt_id": o.effect.attempt_id,
                    "outcome": ("resent" if o.effect.resends else "sent")
                    if o.error is None
                    else "failed",
                    "now": now,
                    "error": o.error,
                }
                for o in done
            ],
        )
        sent = [_ours(o.effect) for o in done if o.error is None]
        applied: set[int] = set()
        if sent:
            applied.update(
                row.id for row in connection.execute(_MARK_SENT, {"ours": sent, "now": now})
            )
        for outcome in done:
            if outcome.error is not None and self._apply_failure(connection, outcome, now):
                applied.add(outcome.effect.id)
        return applied

    def _apply_failure(self, connection: Connection, outcome: _Outcome, now: float) -> bool:
        effect = outcome.effect
        values: dict[str, Any] = {"lease_expires_at": None, "last_error": outcome.error}
        if outcome.dead:
            values["state"] = "dead"
        else:
            values["state"] = "retryable"
            values["run_at"] = next_run_at(
                now,
                effect.attempts,
                self._settings.retry_base_seconds,
                self._settings.retry_max_seconds,
                self._rng,
            )
        updated = connection.execute(
            sa.update(effects).where(_THIS, _OURS).values(**values),
            {"effect_id": effect.id, "claimed_attempts": effect.attempts},
        ).rowcount
        return bool(updated)

    def _observe(self, done: list[_Outcome], applied: set[int]) -> None:
        for outcome in done:
            effect = outcome.effect
            labels = (effect.channel, effect.kind)
            if effect.id not in applied:
                _log.warning(
                    "effect outcome recorded after its lease was lost", effect_id=effect.id
                )
            if outcome.error is None:
                EFFECTS_SENT.labels(*labels).inc()
                continue
            EFFECTS_FAILED.labels(*labels).inc()
            if outcome.dead:
                EFFECTS_DEAD.labels(*labels).inc()
            _log.warning(
                "effect dead" if outcome.dead else "effect failed; will retry",
                effect_id=effect.id,
                key=effect.idempotency_key,
                attempts=effect.attempts,
                error=outcome.error,
            )


@dataclass(frozen=True)
class _Outcome:
    effect: _Claimed
    # None: handed over. Otherwise why it was not.
    error: str | None
    permanent: bool

    @property
    def dead(self) -> bool:
        return self.error is not None and (
            self.permanent or self.effect.attempts >= self.effect.max_attempts
        )


def _set_attempt_counts(connection: Connection, claimed: list[_Claimed]) -> None:
    if not claimed:
        return
    # A result has `.keys()`, so dict() would take it for a mapping: build it row by row.
    counts = {
        int(row[0]): int(row[1])
        for row in connection.execute(
            sa.select(effect_attempts.c.effect_id, sa.func.count())
            .where(effect_attempts.c.effect_id.in_([e.id for e in claimed]))
            .group_by(effect_attempts.c.effect_id)
        )
    }
    for e in claimed:
        e.recorded_attempts = counts.get(e.id, 0)


def _ours(effect: _Claimed) -> tuple[int, int]:
    return (effect.id, effect.attempts)


# Statements of the hot path, built once: building them costs more CPU than running them. A
# dispatcher that reclaimed the row after our lease ran out has bumped `attempts`, so (id, still
# sending, same attempts) is what says the row is still ours; a batch checks its rows in one
# statement with a row-value IN over (id, attempts).
_OURS = sa.and_(
    effects.c.state == "sending",
    effects.c.attempts == sa.bindparam("claimed_attempts", type_=sa.Integer()),
)
_THIS = effects.c.id == sa.bindparam("effect_id", type_=sa.BigInteger())
_ALL_OURS = sa.and_(
    effects.c.state == "sending",
    sa.tuple_(effects.c.id, effects.c.attempts).in_(sa.bindparam("ours", expanding=True)),
)
_RENEW = (
    sa.update(effects)
    .where(_ALL_OURS)
    .values(lease_expires_at=sa.bindparam("lease", type_=sa.Double()))
    .returning(effects.c.id)
)
_MARK_SENT = (
    sa.update(effects)
    .where(_ALL_OURS)
    .values(
        state="sent",
        sent_at=sa.bindparam("now", type_=sa.Double()),
        lease_expires_at=None,
        last_error=None,
    )
    .returning(effects.c.id)
)
_CLOSE_ATTEMPT = (
    sa.update(effect_attempts)
    .where(effect_attempts.c.id == sa.bindparam("attempt_id", type_=sa.BigInteger()))
    .values(
        outcome=sa.bindparam("outcome", type_=sa.String()),
        finished_at=sa.bindparam("now", type_=sa.Double()),
        error=sa.bindparam("error", type_=sa.Text()),
    )
)
# Executed with one parameter set per row (insertmanyvalues); the ids come back in that order.
_OPEN_ATTEMPT = (
    sa.insert(effect_attempts)
    .values(
        effect_id=sa.bindparam("effect_id", type_=sa.BigInteger()),
        attempt=sa.bindparam("attempt", type_=sa.Integer()),
        started_at=sa.bindparam("started_at", type_=sa.Double()),
        outcome="sending",
    )
    .returning(effect_attempts.c.id, sort_by_parameter_order=True)
)
