"""A refund held too long raises the invoice's attention flag by time alone, and the payment
clears it; on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.attention import AttentionSweeper
from billhook.config import load_settings
from billhook.processing import Processor
from billhook.store.schema import invoices
from test_processing import BASE, PAID, canonical, deliver, deliver_refund_before_payment, drain

ALERT = 3600.0


def _attention(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(invoices.c.attention).where(invoices.c.id == "inv_1")
        ).scalar_one()


def test_held_refund_is_flagged_after_the_alert_delay(database_url: str, engine: Engine) -> None:
    settings = load_settings(database_url=database_url, held_refund_alert_seconds=ALERT)
    processor = Processor(settings, clock=lambda: BASE + 30)
    deliver_refund_before_payment(engine)
    assert drain(engine, processor) == []
    assert _attention(engine) is None

    early = AttentionSweeper(engine, settings, clock=lambda: BASE + 20 + ALERT - 1)
    assert early.run_once() == 0
    late = AttentionSweeper(engine, settings, clock=lambda: BASE + 20 + ALERT + 1)
    assert late.run_once() == 1
    flag = _attention(engine)
    assert flag is not None and "re_1" in flag and "held" in flag
    assert late.run_once() == 0  # within its interval: no second scan

    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE + 10, **PAID))
    assert drain(engine, processor) == []
    assert _attention(engine) is None
