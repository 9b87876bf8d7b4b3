"""Record what became of each claimed effect: `Outcome`, and the `OutcomeRecorder` that commits it.

Step 3 of the dispatcher's ordering: every outcome of a batch in one commit (rows `sent`,
`retryable` or `dead`, attempts closed), or, in a slow batch, the outcomes so far together with
the renewal of the rest's lease (a checkpoint). A row is still ours while it is `sending` with the
attempt count of our claim: a dispatcher that reclaimed it after our lease ran out has bumped it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.config import Settings
from billhook.effects.claim import ClaimedEffect
from billhook.effects.metrics import EFFECTS_DEAD, EFFECTS_FAILED, EFFECTS_SENT
from billhook.observability import get_logger
from billhook.queue.retry import next_run_at
from billhook.store.batch_writes import SQLITE_HELD, held_pairs
from billhook.store.engine import transaction
from billhook.store.schema import effect_attempts, effects

_log = get_logger("billhook.effects")


@dataclass(frozen=True)
class Outcome:
    effect: ClaimedEffect
    # None: handed over. Otherwise why it was not.
    error: str | None
    permanent: bool

    @property
    def dead(self) -> bool:
        return self.error is not None and (
            self.permanent or self.effect.attempts >= self.effect.max_attempts
        )


class OutcomeRecorder:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        lease_seconds: float,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._rng = rng
        self._lease = lease_seconds

    def checkpoint(self, done: list[Outcome], rest: list[ClaimedEffect]) -> set[int]:
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
        _observe(done, applied)
        lost = {e.id for e in rest} - renewed
        for effect_id in sorted(lost):
            _log.warning("effect lease lost before hand-over; skipped", effect_id=effect_id)
        return lost

    def record(self, done: list[Outcome]) -> None:
        """Every outcome of the batch in one commit."""
        if not done:
            return
        now = self._clock()
        with transaction(self._engine) as connection:
            applied = self._apply(connection, done, now)
        _observe(done, applied)

    def _apply(self, connection: Connection, done: list[Outcome], now: float) -> set[int]:
        """Write the outcomes; returns the ids of the rows that were still ours.

        Attempts are closed either way: a row no longer ours keeps an honest history.
        """
        if not done:
            return set()
        closed = [
            (
                ("resent" if o.effect.resends else "sent") if o.error is None else "failed",
                now,
                o.error,
                o.effect.attempt_id,
            )
            for o in done
        ]
        sent = [_ours(o.effect) for o in done if o.error is None]
        applied: set[int] = set()
        if connection.dialect.name == "sqlite":
            # Fixed driver SQL: an executemany of tuples, and the sent rows as one JSON parameter,
            # so no per-row parameter processing and no IN list rendered per batch size.
            connection.exec_driver_sql(_CLOSE_ATTEMPT_SQLITE, closed)
            if sent:
                rows = connection.exec_driver_sql(_MARK_SENT_SQLITE, (now, held_pairs(sent)))
                applied.update(int(row[0]) for row in rows)
        else:
            connection.execute(
                _CLOSE_ATTEMPT,
                [
                    {"outcome": outcome, "now": at, "error": error, "attempt_id": attempt_id}
                    for outcome, at, error, attempt_id in closed
                ],
            )
            if sent:
                applied.update(
                    row.id for row in connection.execute(_MARK_SENT, {"ours": sent, "now": now})
                )
        for outcome in done:
            if outcome.error is not None and self._apply_failure(connection, outcome, now):
                applied.add(outcome.effect.id)
        return applied

    def _apply_failure(self, connection: Connection, outcome: Outcome, now: float) -> bool:
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


def _observe(done: list[Outcome], applied: set[int]) -> None:
    for outcome in done:
        effect = outcome.effect
        labels = (effect.channel, effect.kind)
        if effect.id not in applied:
            _log.warning("effect outcome recorded after its lease was lost", effect_id=effect.id)
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


def _ours(effect: ClaimedEffect) -> tuple[int, int]:
    return (effect.id, effect.attempts)


# Statements of the hot path, built once: building them costs more CPU than running them. A
# batch checks its rows in one statement with a row-value IN over (id, attempts).
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
_CLOSE_ATTEMPT_SQLITE = (
    f"UPDATE {effect_attempts.name} SET outcome = ?, finished_at = ?, error = ? WHERE id = ?"
)
_MARK_SENT_SQLITE = (
    f"UPDATE {effects.name} SET state = 'sent', sent_at = ?, lease_expires_at = NULL, "
    "last_error = NULL WHERE state = 'sending' "
    f"AND {SQLITE_HELD} RETURNING id"
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
