"""What a replay would change in one invoice: its stored row and outbox before, its fold after.

`InvoiceDiff` is the answer: the row's fields before → after (`field_changes` of `stored_view`
and `folded_view`), the effects the fold implies that the outbox does not hold yet
(`new_effects` against `existing_keys`), and the sent effects `--resend-effects` would put back
(`sent_effects`). The readers here never write and never lock, unless a rebuild asks `read_row`
to lock the row it is about to rewrite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billhook.billing import EffectIntent, InvoiceState, summarize
from billhook.ops.replay_selection import CHUNK
from billhook.store.invoices import SUMMARY_COLUMNS, summary_columns
from billhook.store.schema import effects, invoices


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class EffectPreview:
    kind: str
    idempotency_key: str


@dataclass(frozen=True)
class InvoiceDiff:
    """One invoice: its fields before → after, effects not yet in the outbox, effects to resend."""

    invoice_id: str
    known: bool
    events: int
    changes: tuple[FieldChange, ...] = ()
    new_effects: tuple[EffectPreview, ...] = ()
    resend: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.new_effects or self.resend)


@dataclass(frozen=True)
class StoredRow:
    columns: dict[str, Any]
    # None when the stored JSON cannot be read (only a rebuild mends that).
    state: InvoiceState | None
    version: int
    attention: str | None
    source: str


def read_row(connection: Connection, invoice_id: str, *, lock: bool) -> StoredRow | None:
    query = sa.select(invoices).where(invoices.c.id == invoice_id)
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).mappings().first()
    if row is None:
        return None
    try:
        state: InvoiceState | None = InvoiceState.from_dict(orjson.loads(row["state"]))
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        state = None
    return StoredRow(
        columns={name: row[name] for name in SUMMARY_COLUMNS},
        state=state,
        version=int(row["version"]),
        attention=row["attention"],
        source=row["source"],
    )


def existing_keys(connection: Connection, keys: Sequence[str]) -> set[str]:
    unique = sorted(set(keys))
    found: set[str] = set()
    for start in range(0, len(unique), CHUNK):
        found.update(
            connection.execute(
                sa.select(effects.c.idempotency_key).where(
                    effects.c.idempotency_key.in_(unique[start : start + CHUNK])
                )
            ).scalars()
        )
    return found


def sent_effects(
    connection: Connection, invoice_ids: Sequence[str], kind: str | None
) -> dict[str, tuple[str, ...]]:
    """Keys of the sent effects of `kind` per invoice (what `--resend-effects` puts back)."""
    if kind is None:
        return {}
    found: dict[str, list[str]] = {}
    ids = list(invoice_ids)
    for start in range(0, len(ids), CHUNK):
        rows = connection.execute(
            sa.select(effects.c.invoice_id, effects.c.idempotency_key)
            .where(
                effects.c.invoice_id.in_(ids[start : start + CHUNK]),
                effects.c.kind == kind,
                effects.c.state == "sent",
            )
            .order_by(effects.c.id)
        )
        for row in rows:
            found.setdefault(row.invoice_id, []).append(row.idempotency_key)
    return {invoice_id: tuple(keys) for invoice_id, keys in found.items()}


def folded_view(state: InvoiceState) -> dict[str, Any]:
    """The invoice as its row would show it (summary, with the columns' own representation)."""
    summary = summarize(state)
    columns = summary_columns(state)
    return {**summary, **columns}


def stored_view(stored: StoredRow | None) -> dict[str, Any]:
    if stored is None:
        return {}
    base = summarize(stored.state) if stored.state is not None else {}
    return {**base, **stored.columns, "disputed": bool(stored.columns["disputed"])}


def field_changes(before: dict[str, Any], after: dict[str, Any]) -> Iterable[FieldChange]:
    for name, value in after.items():
        if name != "id" and before.get(name) != value:
            yield FieldChange(name, before.get(name), value)


def new_effects(intents: Iterable[EffectIntent], outbox: set[str]) -> tuple[EffectPreview, ...]:
    seen: dict[str, EffectPreview] = {}
    for intent in intents:
        key = intent.idempotency_key
        if key not in outbox and key not in seen:
            seen[key] = EffectPreview(str(intent.kind), key)
    return tuple(seen.values())
