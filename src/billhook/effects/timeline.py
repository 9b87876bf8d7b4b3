"""Each effect of an invoice with every attempt and its outcome, for `billhook explain`."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.store.schema import effect_attempts, effects


@dataclass(frozen=True)
class EffectAttemptRecord:
    attempt: int
    started_at: float
    finished_at: float | None
    # sending (handed over, not yet recorded; with an error if the dispatcher stopped there),
    # sent, failed, or resent (sent again under the same key after such a stop).
    outcome: str
    error: str | None


@dataclass(frozen=True)
class EffectHistory:
    id: int
    idempotency_key: str
    kind: str
    channel: str
    state: str
    attempts: int
    max_attempts: int
    resends: int
    created_at: float
    sent_at: float | None
    last_error: str | None
    event_pk: int | None
    history: list[EffectAttemptRecord] = field(default_factory=list)


def effect_timeline(engine: Engine, invoice_id: str) -> list[EffectHistory]:
    """The invoice's effects in creation order, each with its attempts in order."""
    with engine.connect() as connection:
        rows = (
            connection.execute(
                sa.select(effects).where(effects.c.invoice_id == invoice_id).order_by(effects.c.id)
            )
            .mappings()
            .all()
        )
        attempts = (
            connection.execute(
                sa.select(effect_attempts)
                .where(effect_attempts.c.effect_id.in_([row["id"] for row in rows]))
                .order_by(effect_attempts.c.id)
            )
            .mappings()
            .all()
            if rows
            else []
        )
    by_effect: dict[int, list[EffectAttemptRecord]] = {}
    for attempt in attempts:
        by_effect.setdefault(int(attempt["effect_id"]), []).append(
            EffectAttemptRecord(
                attempt=int(attempt["attempt"]),
                started_at=float(attempt["started_at"]),
                finished_at=attempt["finished_at"],
                outcome=attempt["outcome"],
                error=attempt["error"],
            )
        )
    return [
        EffectHistory(
            id=int(row["id"]),
            idempotency_key=row["idempotency_key"],
            kind=row["kind"],
            channel=row["channel"],
            state=row["state"],
            attempts=int(row["attempts"]),
            max_attempts=int(row["max_attempts"]),
            resends=int(row["resends"]),
            created_at=float(row["created_at"]),
            sent_at=row["sent_at"],
            last_error=row["last_error"],
            event_pk=row["event_pk"],
            history=by_effect.get(int(row["id"]), []),
        )
        for row in rows
    ]
