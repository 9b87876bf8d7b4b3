"""Invoice rows: load the model's state, write it back under a version check, keep its story.

The pure model owns the rules; this module only moves `InvoiceState` in and out of the
`invoices` row (summary columns for queries, the whole state as JSON) and appends
`invoice_transitions`. Every write is `UPDATE … WHERE version = :seen`, so two writers that
raced on one invoice cannot both win: the loser retries with the fresh state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from billhook.billing import Change, InvoiceState
from billhook.errors import BillhookError
from billhook.store import batch_writes
from billhook.store.batch_writes import BatchWrite, write_many
from billhook.store.engine import among_per_dialect
from billhook.store.schema import charge_links, events, invoice_transitions, invoices


class ConcurrentUpdate(BillhookError):
    """Another writer changed the invoice first; the job retries on the fresh state."""


@dataclass(frozen=True)
class StoredInvoice:
    state: InvoiceState
    version: int
    attention: str | None


def load_invoice(connection: Connection, invoice_id: str, *, lock: bool) -> StoredInvoice | None:
    found = load_invoices(connection, [invoice_id], lock=lock).get(invoice_id)
    if isinstance(found, ValueError):
        raise found
    return found


def load_invoices(
    connection: Connection, invoice_ids: Sequence[str], *, lock: bool
) -> dict[str, StoredInvoice | ValueError]:
    """The stored invoices among `invoice_ids` (a ValueError for a state that cannot be read).

    `lock` takes their row locks on PostgreSQL, in id order so that two writers locking
    overlapping sets wait for each other instead of deadlocking."""
    postgres = connection.dialect.name == "postgresql"
    query = _LOAD_MANY_LOCKED if lock and postgres else _LOAD_MANY[postgres]
    found: dict[str, StoredInvoice | ValueError] = {}
    ids = sorted(invoice_ids)
    for start in range(0, len(ids), _CHUNK):
        rows = connection.execute(query, {"ids": ids[start : start + _CHUNK]})
        for row in rows:
            try:
                state = InvoiceState.from_dict(orjson.loads(row.state))
            except (ValueError, AttributeError, KeyError, TypeError) as exc:
                found[row.id] = ValueError(
                    f"the stored state of invoice {row.id} is unreadable: {exc}"
                )
                continue
            found[row.id] = StoredInvoice(state, row.version, row.attention)
    return found


def summary_columns(state: InvoiceState) -> dict[str, Any]:
    """The invoice row's query columns: the fields of `summarize` they show (read from the
    state's view directly: the whole summary, refund and dispute lists included, cost more
    than the rest of the row)."""
    status = state.status
    return {
        "number": state.number,
        "status": None if status is None else status.value,
        "disputed": bool(state.disputed),
        "currency": state.currency,
        "amount_due": state.amount_due or 0,
        "amount_paid": state.amount_paid or 0,
        "amount_refunded": state.amount_refunded or 0,
        "customer_email": state.customer_email,
    }


def invoice_columns(state: InvoiceState, attention: str | None, now: float) -> dict[str, Any]:
    """Every column an invoice write sets from the model's state."""
    return {
        **summary_columns(state),
        "state": orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS).decode(),
        "attention": attention,
        "updated_at": now,
    }


def save_invoice(
    connection: Connection,
    state: InvoiceState,
    *,
    source: str,
    seen: StoredInvoice | None,
    attention: str | None,
    now: float,
) -> None:
    """Insert a new invoice or update the one read as `seen`; `ConcurrentUpdate` if it moved."""
    values = invoice_columns(state, attention, now)
    if seen is None:
        statement = _INSERT_INVOICE[connection.dialect.name == "postgresql"]
        created = connection.execute(
            statement,
            {"id": state.invoice_id, "source": source, "version": 1, "created_at": now, **values},
        ).first()
        if created is None:
            raise ConcurrentUpdate(f"invoice {state.invoice_id} was created concurrently")
        return
    update_invoices(connection, [(seen, values)])


def record_changes(
    connection: Connection,
    invoice_id: str,
    changes: Iterable[Change],
    *,
    event_pk: int | None,
    now: float,
) -> None:
    insert_transitions(connection, transition_rows(invoice_id, changes, event_pk=event_pk, now=now))


def transition_rows(
    invoice_id: str, changes: Iterable[Change], *, event_pk: int | None, now: float
) -> list[dict[str, Any]]:
    """`invoice_transitions` rows for the model's changes, naming the event that caused them."""
    return [
        {
            "invoice_id": invoice_id,
            "event_pk": event_pk,
            "from_status": None if change.from_status is None else change.from_status.value,
            "to_status": None if change.to_status is None else change.to_status.value,
            "reason": change.reason,
            "at": now,
        }
        for change in changes
    ]


def insert_transitions(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        write_many(
            connection, _TRANSITIONS, [tuple(row[c] for c in _TRANSITION_COLUMNS) for row in rows]
        )


def insert_invoices(connection: Connection, rows: list[dict[str, Any]], *, now: float) -> None:
    """Insert new invoices (rows of `invoice_columns` plus id and source), version 1.

    `ConcurrentUpdate` when another writer created one of them first: nothing is kept then."""
    if not rows:
        return
    params = [(row["id"], row["source"], *(row[c] for c in _SUMMARY_NAMES), 1, now) for row in rows]
    try:
        write_many(connection, _INVOICES, params)
    except sa.exc.IntegrityError as exc:
        raise ConcurrentUpdate(
            f"one of {len(rows)} new invoices was created concurrently; retry on the fresh state"
        ) from exc


def update_invoices(
    connection: Connection, rows: Sequence[tuple[StoredInvoice, dict[str, Any]]]
) -> None:
    """Write new columns over invoices read as `seen`, each under its version check."""
    if not rows:
        return
    params = [
        (
            *(columns[c] for c in _SUMMARY_NAMES),
            seen.version + 1,
            seen.state.invoice_id,
            seen.version,
        )
        for seen, columns in rows
    ]
    if write_many(connection, _UPDATES, params) != len(params):
        moved = rows[0][0].state.invoice_id if len(rows) == 1 else "an invoice"
        raise ConcurrentUpdate(f"{moved} changed while this event was applied")


def link_charge(connection: Connection, charge_id: str, invoice_id: str, now: float) -> None:
    link_charges(connection, {charge_id: invoice_id}, now)


def link_charges(connection: Connection, links: dict[str, str], now: float) -> None:
    """Record charge -> invoice links; a charge already linked keeps its invoice."""
    if links:
        write_many(
            connection, _LINKS, [(charge, invoice, now) for charge, invoice in links.items()]
        )


def charge_invoices(connection: Connection, charge_ids: Sequence[str]) -> dict[str, str]:
    """The invoice of each linked charge among `charge_ids`."""
    found: dict[str, str] = {}
    ids = list(charge_ids)
    for start in range(0, len(ids), _CHUNK):
        rows = connection.execute(
            _CHARGES_INVOICES[connection.dialect.name == "postgresql"],
            {"ids": ids[start : start + _CHUNK]},
        )
        found.update({row.charge_id: row.invoice_id for row in rows})
    return found


def invoice_for_charge(connection: Connection, charge_id: str) -> str | None:
    return charge_invoices(connection, [charge_id]).get(charge_id)


def charges_of(connection: Connection, invoice_id: str) -> list[str]:
    return list(
        connection.execute(
            sa.select(charge_links.c.charge_id).where(charge_links.c.invoice_id == invoice_id)
        ).scalars()
    )


def events_about(connection: Connection, invoice_id: str) -> sa.ColumnElement[bool]:
    """A filter on `events` for the events about one invoice: keyed on it, keyed on one of its
    charges (refunds, disputes), or named by one of its recorded changes."""
    charge_keys = [f"charge:{charge}" for charge in charges_of(connection, invoice_id)]
    caused = sa.select(invoice_transitions.c.event_pk).where(
        invoice_transitions.c.invoice_id == invoice_id,
        invoice_transitions.c.event_pk.is_not(None),
    )
    return sa.or_(events.c.ordering_key.in_([invoice_id, *charge_keys]), events.c.id.in_(caused))


# The hot-path statements, built once with bind parameters: building a statement per call cost
# more CPU than running it (profile in bench/RESULTS.md). ON CONFLICT inserts are per dialect,
# indexed by `dialect is postgresql`.
_CHUNK = 500


_LOAD_MANY = tuple(
    sa.select(invoices.c.id, invoices.c.state, invoices.c.version, invoices.c.attention)
    .where(among)
    .order_by(invoices.c.id)
    for among in among_per_dialect(invoices.c.id, sa.String())
)
_LOAD_MANY_LOCKED = _LOAD_MANY[True].with_for_update()
# The queryable summary of an invoice's state (`summary_columns`), as stored.
SUMMARY_COLUMNS = (
    "number",
    "status",
    "disputed",
    "currency",
    "amount_due",
    "amount_paid",
    "amount_refunded",
    "customer_email",
)
_SUMMARY_NAMES = (*SUMMARY_COLUMNS, "state", "attention", "updated_at")
_INSERT_INVOICE = tuple(
    dialect.insert(invoices)
    .values(
        {
            name: sa.bindparam(name)
            for name in ("id", "source", "version", "created_at", *_SUMMARY_NAMES)
        }
    )
    .on_conflict_do_nothing(index_elements=[invoices.c.id])
    .returning(invoices.c.id)
    for dialect in (sqlite, postgresql)
)

# name: PostgreSQL type, in the order the written tuples give them.
_SUMMARY_TYPES = {
    "number": "text",
    "status": "text",
    "disputed": "bool",
    "currency": "text",
    "amount_due": "int8",
    "amount_paid": "int8",
    "amount_refunded": "int8",
    "customer_email": "text",
    "state": "text",
    "attention": "text",
    "updated_at": "float8",
}
_INVOICES = batch_writes.insert(
    "invoices",
    {"id": "text", "source": "text", **_SUMMARY_TYPES, "version": "int4", "created_at": "float8"},
)
# Each row under its version check; the row count says whether every one was still as read.
_UPDATED = {**_SUMMARY_TYPES, "version": "int4", "id": "text", "seen_version": "int4"}
_UPDATES = BatchWrite(
    "UPDATE invoices SET "
    + ", ".join(f"{name} = ?" for name in (*_SUMMARY_NAMES, "version"))
    + " WHERE id = ? AND version = ?",
    "UPDATE invoices AS i SET "
    + ", ".join(f"{name} = v.{name}" for name in (*_SUMMARY_NAMES, "version"))
    + f" FROM unnest({batch_writes.arrays(_UPDATED)}) AS v({', '.join(_UPDATED)})"
    + " WHERE i.id = v.id AND i.version = v.seen_version",
    batch_writes.floats(_UPDATED),
)
_TRANSITION_COLUMNS = {
    "invoice_id": "text",
    "event_pk": "int8",
    "from_status": "text",
    "to_status": "text",
    "reason": "text",
    "at": "float8",
}
_TRANSITIONS = batch_writes.insert("invoice_transitions", _TRANSITION_COLUMNS)
_LINKS = batch_writes.insert(
    "charge_links",
    {"charge_id": "text", "invoice_id": "text", "created_at": "float8"},
    suffix=" ON CONFLICT (charge_id) DO NOTHING",
)
_CHARGES_INVOICES = tuple(
    sa.select(charge_links.c.charge_id, charge_links.c.invoice_id).where(among)
    for among in among_per_dialect(charge_links.c.charge_id, sa.String())
)
