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

from billhook.billing import Change, InvoiceState, summarize
from billhook.errors import BillhookError
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
    """The invoice row's query columns, as the model's summary fills them."""
    summary = summarize(state)
    return {
        "number": summary["number"],
        "status": summary["status"],
        "disputed": bool(summary["disputed"]),
        "currency": summary["currency"],
        "amount_due": summary["amount_due"] or 0,
        "amount_paid": summary["amount_paid"] or 0,
        "amount_refunded": summary["amount_refunded"] or 0,
        "customer_email": summary["customer_email"],
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
        connection.execute(_INSERT_TRANSITION, rows)


def insert_invoices(connection: Connection, rows: list[dict[str, Any]], *, now: float) -> None:
    """Insert new invoices (rows of `invoice_columns` plus id and source), version 1.

    `ConcurrentUpdate` when another writer created one of them first: nothing is kept then."""
    if not rows:
        return
    params = [{**row, "version": 1, "created_at": now} for row in rows]
    try:
        # A plain executemany: one statement text whatever the batch size.
        connection.execute(_INSERT_INVOICES, params)
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
        {
            "invoice_id": seen.state.invoice_id,
            "seen_version": seen.version,
            "version": seen.version + 1,
            **columns,
        }
        for seen, columns in rows
    ]
    result = connection.execute(_UPDATE_INVOICE, params)
    if result.rowcount != len(params):
        moved = rows[0][0].state.invoice_id if len(rows) == 1 else "an invoice"
        raise ConcurrentUpdate(f"{moved} changed while this event was applied")


def link_charge(connection: Connection, charge_id: str, invoice_id: str, now: float) -> None:
    link_charges(connection, {charge_id: invoice_id}, now)


def link_charges(connection: Connection, links: dict[str, str], now: float) -> None:
    """Record charge -> invoice links; a charge already linked keeps its invoice."""
    if links:
        connection.execute(
            _LINK_CHARGE[connection.dialect.name == "postgresql"],
            [
                {"charge_id": charge, "invoice_id": invoice, "created_at": now}
                for charge, invoice in links.items()
            ],
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
_SUMMARY_NAMES = (
    "number",
    "status",
    "disputed",
    "currency",
    "amount_due",
    "amount_paid",
    "amount_refunded",
    "customer_email",
    "state",
    "attention",
    "updated_at",
)
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
_INSERT_INVOICES = invoices.insert().values(
    {
        name: sa.bindparam(name)
        for name in ("id", "source", "version", "created_at", *_SUMMARY_NAMES)
    }
)
_UPDATE_INVOICE = (
    invoices.update()
    .where(
        invoices.c.id == sa.bindparam("invoice_id", type_=sa.String()),
        invoices.c.version == sa.bindparam("seen_version", type_=sa.Integer()),
    )
    .values({name: sa.bindparam(name) for name in ("version", *_SUMMARY_NAMES)})
)
_INSERT_TRANSITION = invoice_transitions.insert()
_LINK_CHARGE = tuple(
    dialect.insert(charge_links)
    .values(
        charge_id=sa.bindparam("charge_id"),
        invoice_id=sa.bindparam("invoice_id"),
        created_at=sa.bindparam("created_at"),
    )
    .on_conflict_do_nothing(index_elements=[charge_links.c.charge_id])
    for dialect in (sqlite, postgresql)
)
_CHARGES_INVOICES = tuple(
    sa.select(charge_links.c.charge_id, charge_links.c.invoice_id).where(among)
    for among in among_per_dialect(charge_links.c.charge_id, sa.String())
)
