"""Read invoices for operators: one by id, or a filtered page, newest change first."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import InvalidRequest, NotFound
from billhook.ops.pages import DEFAULT_LIMIT, Page, check_limit, decode_cursor, encode_cursor
from billhook.store.schema import INVOICE_STATUSES, invoices


@dataclass(frozen=True)
class InvoiceView:
    id: str
    source: str
    number: str | None
    status: str | None
    disputed: bool
    currency: str | None
    amount_due: int
    amount_paid: int
    amount_refunded: int
    customer_email: str | None
    attention: str | None
    created_at: float
    updated_at: float


_COLUMNS = (
    invoices.c.id,
    invoices.c.source,
    invoices.c.number,
    invoices.c.status,
    invoices.c.disputed,
    invoices.c.currency,
    invoices.c.amount_due,
    invoices.c.amount_paid,
    invoices.c.amount_refunded,
    invoices.c.customer_email,
    invoices.c.attention,
    invoices.c.created_at,
    invoices.c.updated_at,
)


def get_invoice(engine: Engine, invoice_id: str) -> InvoiceView:
    with engine.connect() as connection:
        row = (
            connection.execute(sa.select(*_COLUMNS).where(invoices.c.id == invoice_id))
            .mappings()
            .first()
        )
    if row is None:
        raise NotFound(
            f"no invoice {invoice_id!r}; billhook knows an invoice once one of its events "
            "was processed (list them with GET /api/v1/invoices)"
        )
    return _view(row)


def list_invoices(
    engine: Engine,
    *,
    status: str | None = None,
    email: str | None = None,
    updated_since: float | None = None,
    updated_until: float | None = None,
    attention: bool | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page[InvoiceView]:
    """Invoices matching every filter given, by `updated_at` then id, newest first.

    `email` matches case-insensitively; `updated_since` is inclusive, `updated_until` exclusive.
    """
    check_limit(limit)
    if status is not None and status not in INVOICE_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(INVOICE_STATUSES)}, got {status!r}")
    query = sa.select(*_COLUMNS).order_by(invoices.c.updated_at.desc(), invoices.c.id.desc())
    if status is not None:
        query = query.where(invoices.c.status == status)
    if email is not None:
        query = query.where(sa.func.lower(invoices.c.customer_email) == email.lower())
    if updated_since is not None:
        query = query.where(invoices.c.updated_at >= updated_since)
    if updated_until is not None:
        query = query.where(invoices.c.updated_at < updated_until)
    if attention is not None:
        query = query.where(
            invoices.c.attention.is_not(None) if attention else invoices.c.attention.is_(None)
        )
    if cursor is not None:
        after_updated, after_id = decode_cursor(cursor, (float, str))
        query = query.where(
            sa.or_(
                invoices.c.updated_at < after_updated,
                sa.and_(invoices.c.updated_at == after_updated, invoices.c.id < after_id),
            )
        )
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit + 1)).mappings().all()
    items = [_view(row) for row in rows[:limit]]
    next_cursor = encode_cursor([items[-1].updated_at, items[-1].id]) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


def _view(row: sa.RowMapping) -> InvoiceView:
    return InvoiceView(
        id=row["id"],
        source=row["source"],
        number=row["number"],
        status=row["status"],
        disputed=bool(row["disputed"]),
        currency=row["currency"],
        amount_due=int(row["amount_due"]),
        amount_paid=int(row["amount_paid"]),
        amount_refunded=int(row["amount_refunded"]),
        customer_email=row["customer_email"],
        attention=row["attention"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
