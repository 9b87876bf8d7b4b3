"""`AttentionSweeper`: flag invoices whose refunds have waited too long for their payment.

Processing flags an invoice when an event arrives; a held refund whose payment never comes
brings no event at all, so time alone must raise the flag. The sweeper re-evaluates the unpaid
invoices every `interval_seconds` with the model's own `needs_attention` and writes the
`attention` column under the row's version, so it never overwrites a newer state's verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.applying import merge_attention
from billhook.billing import InvoiceState, needs_attention
from billhook.config import Settings
from billhook.store.engine import transaction
from billhook.store.schema import invoices

UNPAID = ("draft", "open", "uncollectible", "void")


class AttentionSweeper:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last_sweep: float | None = None

    def run_once(self) -> int:
        """Re-evaluate unpaid invoices when the interval has passed; return how many changed."""
        now = self.clock()
        if self._last_sweep is not None and now - self._last_sweep < self.interval_seconds:
            return 0
        self._last_sweep = now
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(invoices.c.id, invoices.c.state, invoices.c.version, invoices.c.attention)
                .where(sa.or_(invoices.c.status.is_(None), invoices.c.status.in_(UNPAID)))
            ).all()
        changed = 0
        for row in rows:
            state = InvoiceState.from_dict(orjson.loads(row.state))
            verdict = needs_attention(
                state, now=now, held_refund_alert_seconds=self.settings.held_refund_alert_seconds
            )
            attention = merge_attention(verdict, row.attention)
            if attention == row.attention:
                continue
            with transaction(self.engine) as connection:
                result = connection.execute(
                    invoices.update()
                    .where(invoices.c.id == row.id, invoices.c.version == row.version)
                    .values(attention=attention)
                )
            changed += result.rowcount
        return changed
