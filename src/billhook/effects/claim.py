"""Claim a batch of due effects: `claim_effects`, and the `ClaimedEffect` rows it returns.

One commit per batch (step 1 of the dispatcher's ordering): every claimed row becomes `sending`
under a lease and gets its `sending` attempt. The same commit dead-letters rows whose lease ran
out on their last attempt, and closes the attempts a dead dispatcher left open: their rows are in
doubt (the message may already be delivered), so `resends` goes up and they are sent again under
the same key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.effects.metrics import EFFECTS_DEAD, EFFECTS_RESENT
from billhook.observability import get_logger
from billhook.queue.claims import PAUSED_KEY
from billhook.store.engine import among_per_dialect, transaction
from billhook.store.schema import effect_attempts, effects, invoices
from billhook.store.schema import settings as switches

_IN_DOUBT_ERROR = (
    "lease expired after the message was handed over (dispatcher stopped?); "
    "delivery unknown, sent again under the same key"
)
_EXHAUSTED_ERROR = (
    "the dispatcher stopped during the last attempt (lease expired); the message may or may not "
    "have been delivered; redrive to send it again under the same key"
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
        statements = _statements(connection.dialect.name == "postgresql")
        _bury_exhausted(connection, statements, now, limit)
        rescued = _claim(connection, statements.rescue, now, limit, lease_seconds)
        fresh = _claim(connection, statements.due, now, limit - len(rescued), lease_seconds)
        in_doubt = _close_open_attempts(connection, statements, [e.id for e in rescued], now)
        if in_doubt:
            connection.execute(statements.count_resend, {"ids": sorted(in_doubt)})
        for effect in rescued:
            if effect.id in in_doubt:
                effect.resends += 1
        claimed = rescued + fresh
        _set_recipients(connection, statements, claimed)
        _set_attempt_counts(connection, statements, claimed)
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


def _claim(
    connection: Connection, statement: sa.Update, now: float, limit: int, lease_seconds: float
) -> list[ClaimedEffect]:
    if limit <= 0:
        return []
    rows = connection.execute(
        statement, {"now": now, "limit": limit, "lease": now + lease_seconds}
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


def _bury_exhausted(
    connection: Connection, statements: _Statements, now: float, limit: int
) -> None:
    """A lease that ran out on the last attempt: dead-letter instead of looping on a crash."""
    rows = connection.execute(statements.bury, {"now": now, "limit": limit}).all()
    _close_open_attempts(connection, statements, [row.id for row in rows], now)
    for row in rows:
        EFFECTS_DEAD.labels(row.channel, row.kind).inc()


def _close_open_attempts(
    connection: Connection, statements: _Statements, effect_ids: list[int], now: float
) -> set[int]:
    """Close attempts a dead dispatcher left `sending`; returns the effects they belong to."""
    if not effect_ids:
        return set()
    rows = connection.execute(statements.close_open, {"ids": effect_ids, "now": now}).all()
    return {row.effect_id for row in rows}


def _set_recipients(
    connection: Connection, statements: _Statements, claimed: list[ClaimedEffect]
) -> None:
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
            for row in connection.execute(statements.emails, {"ids": sorted(missing)})
        }
    for e in claimed:
        if e.channel == "email":
            e.recipient = e.payload.get("customer_email") or current.get(e.invoice_id or "")


def _set_attempt_counts(
    connection: Connection, statements: _Statements, claimed: list[ClaimedEffect]
) -> None:
    if not claimed:
        return
    # A result has `.keys()`, so dict() would take it for a mapping: build it row by row.
    counts = {
        int(row[0]): int(row[1])
        for row in connection.execute(statements.attempt_counts, {"ids": [e.id for e in claimed]})
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
    # One new attempt per claimed effect: matched by effect id, in whatever order they come.
    opened = {row.effect_id: row.id for row in rows}
    for e in claimed:
        e.attempt_id = opened[e.id]


# Built once: building it costs more CPU than running it. Executed with one parameter set per
# row: insertmanyvalues writes them as multi-row INSERTs. (Asking for the ids in parameter order,
# `sort_by_parameter_order`, made SQLite run one INSERT per row: a third of the claim's CPU.)
_OPEN_ATTEMPT = (
    sa.insert(effect_attempts)
    .values(
        effect_id=sa.bindparam("effect_id", type_=sa.BigInteger()),
        attempt=sa.bindparam("attempt", type_=sa.Integer()),
        started_at=sa.bindparam("started_at", type_=sa.Double()),
        outcome="sending",
    )
    .returning(effect_attempts.c.id, effect_attempts.c.effect_id)
)


@dataclass(frozen=True)
class _Statements:
    """The claim's statements for one dialect, built once: building a statement (and coercing an
    IN list of literal ids into bind parameters) cost more CPU than running it."""

    bury: sa.Update
    rescue: sa.Update
    due: sa.Update
    close_open: sa.Update
    count_resend: sa.Update
    emails: sa.Select[Any]
    attempt_counts: sa.Select[Any]


@functools.cache
def _statements(postgresql: bool) -> _Statements:
    now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
    effect_among = among_per_dialect(effects.c.id, sa.BigInteger())[postgresql]
    attempt_among = among_per_dialect(effect_attempts.c.effect_id, sa.BigInteger())[postgresql]
    invoice_among = among_per_dialect(invoices.c.id, sa.String())[postgresql]

    def due_ids(condition: sa.ColumnElement[bool]) -> sa.Select[Any]:
        query = (
            sa.select(effects.c.id)
            .where(condition)
            .order_by(effects.c.run_at)
            .limit(sa.bindparam("limit", type_=sa.Integer()))
        )
        return query.with_for_update(skip_locked=True) if postgresql else query

    def claim(condition: sa.ColumnElement[bool]) -> sa.Update:
        return (
            sa.update(effects)
            .where(effects.c.id.in_(due_ids(condition)))
            .values(
                state="sending",
                attempts=effects.c.attempts + 1,
                lease_expires_at=sa.bindparam("lease", type_=sa.Double()),
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
        )

    expired = sa.and_(effects.c.state == "sending", effects.c.lease_expires_at <= now)
    exhausted = sa.and_(expired, effects.c.attempts >= effects.c.max_attempts)
    return _Statements(
        bury=sa.update(effects)
        .where(effects.c.id.in_(due_ids(exhausted)))
        .values(state="dead", lease_expires_at=None, last_error=_EXHAUSTED_ERROR)
        .returning(effects.c.id, effects.c.kind, effects.c.channel),
        rescue=claim(expired),
        due=claim(
            sa.and_(effects.c.state.in_(("pending", "retryable")), effects.c.run_at <= now)
        ),
        close_open=sa.update(effect_attempts)
        .where(
            attempt_among,
            effect_attempts.c.outcome == "sending",
            effect_attempts.c.finished_at.is_(None),
        )
        .values(finished_at=now, error=_IN_DOUBT_ERROR)
        .returning(effect_attempts.c.effect_id),
        count_resend=sa.update(effects).where(effect_among).values(resends=effects.c.resends + 1),
        emails=sa.select(invoices.c.id, invoices.c.customer_email).where(invoice_among),
        attempt_counts=sa.select(effect_attempts.c.effect_id, sa.func.count())
        .where(attempt_among)
        .group_by(effect_attempts.c.effect_id),
    )
