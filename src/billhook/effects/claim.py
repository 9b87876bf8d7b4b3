"""Claim a batch of due effects: `claim_effects`, and the `ClaimedEffect` rows it returns.

One commit per batch (step 1 of the dispatcher's ordering): every claimed row becomes `sending`
under a lease and gets its `sending` attempt. The same commit dead-letters rows whose lease ran
out on their last attempt, and closes the attempts a dead dispatcher left open: their rows are in
doubt (the message may already be delivered), so `resends` goes up and they are sent again under
the same key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.effects.metrics import EFFECTS_DEAD, EFFECTS_RESENT
from billhook.observability import get_logger
from billhook.queue.claims import PAUSED_KEY
from billhook.store.engine import transaction
from billhook.store.schema import effect_attempts, effects, invoices
from billhook.store.schema import settings as switches

_IN_DOUBT_ERROR = (
    "lease expired after the message was handed over (dispatcher stopped?); "
    "delivery unknown, sent again under the same key"
)
_PAUSED = sa.select(switches.c.key).where(switches.c.key == PAUSED_KEY, switches.c.value == "true")
_log = get_logger("billhook.effects")


# Filled in place while the claim's transaction runs (recipient, attempt numbers), then only
# read: `dataclasses.replace` per row and step cost more than the batch's SQL.
@dataclass(slots=True)
class ClaimedEffect:
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


def claim_effects(
    engine: Engine, now: float, *, limit: int, lease_seconds: float
) -> list[ClaimedEffect]:
    """Up to `limit` rows, expired leases first, each `sending` with an open attempt, committed."""
    with transaction(engine) as connection:
        # `billhook pause` holds effects too: an operator pausing mid-incident (a wrong
        # template, a bad deploy) must be able to stop emails, not only state changes.
        if connection.execute(_PAUSED).first() is not None:
            return []
        _bury_exhausted(connection, now, limit)
        expired = sa.and_(effects.c.state == "sending", effects.c.lease_expires_at <= now)
        rescued = _claim_where(connection, expired, now, limit, lease_seconds)
        due = sa.and_(effects.c.state.in_(("pending", "retryable")), effects.c.run_at <= now)
        fresh = _claim_where(connection, due, now, limit - len(rescued), lease_seconds)
        in_doubt = _close_open_attempts(connection, [e.id for e in rescued], now)
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
        _set_recipients(connection, claimed)
        _set_attempt_counts(connection, claimed)
        _open_attempts(connection, claimed, now)
    for effect in claimed:
        if effect.id in in_doubt:
            EFFECTS_RESENT.labels(effect.channel, effect.kind).inc()
            _log.warning(
                "effect in doubt: resending under the same key",
                effect_id=effect.id,
                key=effect.idempotency_key,
            )
    return claimed


def _due_ids(
    connection: Connection, condition: sa.ColumnElement[bool], limit: int
) -> sa.Select[Any]:
    query = sa.select(effects.c.id).where(condition).order_by(effects.c.run_at).limit(limit)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def _claim_where(
    connection: Connection,
    condition: sa.ColumnElement[bool],
    now: float,
    limit: int,
    lease_seconds: float,
) -> list[ClaimedEffect]:
    if limit <= 0:
        return []
    rows = connection.execute(
        sa.update(effects)
        .where(effects.c.id.in_(_due_ids(connection, condition, limit)))
        .values(
            state="sending",
            attempts=effects.c.attempts + 1,
            lease_expires_at=now + lease_seconds,
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
            ClaimedEffect(
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


def _bury_exhausted(connection: Connection, now: float, limit: int) -> None:
    """A lease that ran out on the last attempt: dead-letter instead of looping on a crash."""
    condition = sa.and_(
        effects.c.state == "sending",
        effects.c.lease_expires_at <= now,
        effects.c.attempts >= effects.c.max_attempts,
    )
    rows = connection.execute(
        sa.update(effects)
        .where(effects.c.id.in_(_due_ids(connection, condition, limit)))
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
    _close_open_attempts(connection, [row.id for row in rows], now)
    for row in rows:
        EFFECTS_DEAD.labels(row.channel, row.kind).inc()


def _close_open_attempts(connection: Connection, effect_ids: list[int], now: float) -> set[int]:
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


def _set_recipients(connection: Connection, claimed: list[ClaimedEffect]) -> None:
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


def _set_attempt_counts(connection: Connection, claimed: list[ClaimedEffect]) -> None:
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


def _open_attempts(connection: Connection, claimed: list[ClaimedEffect], now: float) -> None:
    """A `sending` attempt per claimed row, in the claim's commit: before any hand-over."""
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


# Built once: building it costs more CPU than running it. Executed with one parameter set per
# row (insertmanyvalues); the ids come back in that order.
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
