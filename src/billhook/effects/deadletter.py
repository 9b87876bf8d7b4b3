"""Dead effects: what `billhook dlq list` and the admin API show, and redrive back to pending."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine, RowMapping

from billhook.errors import InvalidRequest, NotFound
from billhook.store.engine import transaction
from billhook.store.schema import effect_attempts, effects


@dataclass(frozen=True)
class DeadEffect:
    id: int
    idempotency_key: str
    kind: str
    channel: str
    invoice_id: str | None
    attempts: int
    last_error: str | None
    # When its last attempt finished (the row itself keeps no death time).
    dead_at: float


def _dead_at() -> sa.ScalarSelect[float]:
    return (
        sa.select(sa.func.max(effect_attempts.c.finished_at))
        .where(effect_attempts.c.effect_id == effects.c.id)
        .scalar_subquery()
    )


def _query() -> sa.Select[tuple[object, ...]]:
    return sa.select(
        effects.c.id,
        effects.c.idempotency_key,
        effects.c.kind,
        effects.c.channel,
        effects.c.invoice_id,
        effects.c.attempts,
        effects.c.last_error,
        sa.func.coalesce(_dead_at(), effects.c.created_at).label("dead_at"),
        effects.c.state,
    )


def _dead_effect(row: RowMapping) -> DeadEffect:
    return DeadEffect(
        id=int(row["id"]),
        idempotency_key=row["idempotency_key"],
        kind=row["kind"],
        channel=row["channel"],
        invoice_id=row["invoice_id"],
        attempts=int(row["attempts"]),
        last_error=row["last_error"],
        dead_at=float(row["dead_at"]),
    )


def list_dead_effects(engine: Engine, *, limit: int | None = None) -> list[DeadEffect]:
    """Dead effects, oldest first."""
    query = _query().where(effects.c.state == "dead").order_by(effects.c.id)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as connection:
        return [_dead_effect(row) for row in connection.execute(query).mappings()]


def redrive_effect(engine: Engine, effect_id: int, now: float) -> DeadEffect:
    """Send a dead effect again: pending, due now, with a fresh attempt budget and backoff.

    Same row, same idempotency key, so the recipient sees the same Message-ID / Idempotency-Key.
    Returns the effect as it was when it was redriven (its last error included).
    """
    with transaction(engine) as connection:
        row = connection.execute(_query().where(effects.c.id == effect_id)).mappings().first()
        if row is None:
            raise NotFound(f"no effect with id {effect_id}; `billhook dlq list` shows dead effects")
        if row["state"] != "dead":
            raise InvalidRequest(
                f"effect {effect_id} ({row['idempotency_key']}) is {row['state']}, not dead; "
                "only dead effects can be redriven"
            )
        connection.execute(
            sa.update(effects)
            .where(effects.c.id == effect_id, effects.c.state == "dead")
            .values(state="pending", attempts=0, run_at=now, lease_expires_at=None)
        )
    return _dead_effect(row)
