"""Write effect intents into the `effects` outbox, in the caller's (billing) transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.config import Settings
from billhook.store import batch_writes
from billhook.store.batch_writes import write_many
from billhook.store.schema import effects

WEBHOOK_KEY_SUFFIX = ":webhook"
BACKLOG_STATES = ("pending", "sending", "retryable")


class EffectIntent(Protocol):
    """What the billing model asks for: one effect, under one idempotency key."""

    @property
    def kind(self) -> str: ...

    @property
    def idempotency_key(self) -> str: ...

    @property
    def payload(self) -> Mapping[str, Any]: ...


def enqueue_effects(
    connection: Connection,
    intents: Iterable[EffectIntent],
    *,
    invoice_id: str | None,
    event_pk: int | None,
    now: float,
    settings: Settings,
) -> int:
    """Insert one email row per intent (and one webhook row when a downstream URL is set).

    A key already in the outbox is skipped by the database (`ON CONFLICT DO NOTHING`), so
    re-applying an event never enqueues its effects twice. Returns the rows actually inserted.
    """
    rows = effect_rows(
        intents, invoice_id=invoice_id, event_pk=event_pk, now=now, settings=settings
    )
    return insert_effects(connection, rows)


def effect_rows(
    intents: Iterable[EffectIntent],
    *,
    invoice_id: str | None,
    event_pk: int | None,
    now: float,
    settings: Settings,
) -> list[dict[str, Any]]:
    """The outbox rows for `intents`: one email each, plus a webhook when a URL is set."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for intent in intents:
        if intent.idempotency_key in seen:
            continue
        seen.add(intent.idempotency_key)
        payload = orjson.dumps(dict(intent.payload)).decode()
        channels = [("email", intent.idempotency_key)]
        if settings.effect_webhook_url:
            channels.append(("webhook", intent.idempotency_key + WEBHOOK_KEY_SUFFIX))
        for channel, key in channels:
            rows.append(
                {
                    "idempotency_key": key,
                    "kind": str(intent.kind),
                    "channel": channel,
                    "invoice_id": invoice_id,
                    "event_pk": event_pk,
                    "payload": payload,
                    "state": "pending",
                    "attempts": 0,
                    "max_attempts": settings.max_attempts,
                    "resends": 0,
                    "run_at": now,
                    "created_at": now,
                }
            )
    return rows


def insert_effects(connection: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert outbox rows, skipping keys the outbox already holds; returns the rows inserted."""
    # One statement text whatever the batch size; the row count leaves out the keys skipped.
    return write_many(
        connection, _INSERT_EFFECTS, [tuple(row[c] for c in _COLUMNS) for row in rows]
    )


def effects_backlog(engine: Engine) -> int:
    """Effects not yet sent nor dead (what `billhook status` shows as `effects_pending`)."""
    with engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count())
            .select_from(effects)
            .where(effects.c.state.in_(BACKLOG_STATES))
        ).scalar_one()
    return int(count)


# name: PostgreSQL type, in the order the written tuples give them.
_COLUMNS = {
    "idempotency_key": "text",
    "kind": "text",
    "channel": "text",
    "invoice_id": "text",
    "event_pk": "int8",
    "payload": "text",
    "state": "text",
    "attempts": "int4",
    "max_attempts": "int4",
    "resends": "int4",
    "run_at": "float8",
    "created_at": "float8",
}
_INSERT_EFFECTS = batch_writes.insert(
    "effects", _COLUMNS, suffix=" ON CONFLICT (idempotency_key) DO NOTHING"
)
