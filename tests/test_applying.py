"""`apply_events`: a batch in one transaction is the same as its events one at a time.

The worker and replay apply many events per transaction with one statement per table; the
property below is what makes that safe: whatever way a delivery order is cut into batches, the
stored invoice, its transitions and its outbox rows are exactly what applying the events one by
one stores. Refunds and disputes are delivered naming only their charge, as Stripe sends them,
so the charge-link resolution inside a batch (a link made by an earlier event of the same
batch) is exercised too. Real SQLite; the batch cases below run on PostgreSQL as well.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from billhook.applying import Arrived, InvoiceNotYetKnown, apply_events
from billhook.billing import BillingEvent, EventKind, apply
from billhook.billing.events import Refund
from billhook.config import Settings
from billhook.effects.outbox import effect_rows, insert_effects
from billhook.store.engine import create_engine, transaction
from billhook.store.invoices import ConcurrentUpdate, insert_invoices, invoice_columns
from billhook.store.migrate import upgrade
from billhook.store.schema import charge_links, effects, invoice_transitions, invoices
from test_billing_properties import deliveries

SETTINGS = Settings(database_url="sqlite:///unused.db")
NOW = 1_700_000_000.0


@contextmanager
def scratch_sqlite() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory(prefix="billhook-applying-") as tmp:
        engine = create_engine(f"sqlite:///{Path(tmp) / 'b.db'}")
        upgrade(engine)
        try:
            yield engine
        finally:
            engine.dispose()


def charge_only(event: BillingEvent) -> BillingEvent:
    """Refunds and disputes as Stripe sends them: about a charge, not an invoice."""
    if event.raw_type.startswith("charge.") and event.charge_id is not None:
        return replace(event, invoice_id=None)
    return event


def apply_in(engine: Engine, batches: Sequence[Sequence[BillingEvent]]) -> list[str]:
    """Apply each batch in its own transaction; events refused for an unknown charge are
    applied again at the end (as the queue's retry would). Returns the refused event ids."""
    refused: list[str] = []
    retry: list[BillingEvent] = []
    for batch in [*batches, None]:
        if batch is None:
            batch, retry = retry, []
        with transaction(engine) as connection:
            outcomes = apply_events(
                connection, [Arrived(e, e.source, None) for e in batch], settings=SETTINGS, now=NOW
            )
        for event, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, InvoiceNotYetKnown):
                refused.append(event.event_id)
                retry.append(event)
            else:
                assert outcome is None, outcome
    return refused


def stored(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(invoices).order_by(invoices.c.id)).mappings().all()
        return {
            "invoices": [
                {k: v for k, v in row.items() if k not in ("version", "created_at")} for row in rows
            ],
            "transitions": connection.execute(
                sa.select(
                    invoice_transitions.c.invoice_id,
                    invoice_transitions.c.from_status,
                    invoice_transitions.c.to_status,
                    invoice_transitions.c.reason,
                ).order_by(invoice_transitions.c.id)
            ).all(),
            "effects": connection.execute(
                sa.select(effects.c.idempotency_key, effects.c.kind, effects.c.payload).order_by(
                    effects.c.idempotency_key
                )
            ).all(),
        }


@given(delivery=deliveries(), cuts=st.lists(st.integers(0, 40), max_size=8))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_any_cut_into_batches_stores_what_one_at_a_time_stores(
    delivery: Any, cuts: list[int]
) -> None:
    _history, order = delivery
    events = [charge_only(e) for e in order]
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    with scratch_sqlite() as one_by_one, scratch_sqlite() as batched:
        refused_alone = apply_in(one_by_one, [[e] for e in events])
        refused_batched = apply_in(batched, batches)
        assert refused_batched == refused_alone
        assert stored(batched) == stored(one_by_one)


@pytest.mark.postgres
@given(delivery=deliveries(), cuts=st.lists(st.integers(0, 40), max_size=8))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the tables are emptied for every example
    ],
)
def test_batches_on_postgresql_store_what_one_at_a_time_stores_on_sqlite(
    postgres_url: str, delivery: Any, cuts: list[int]
) -> None:
    """PostgreSQL writes a batch through its own statements (arrays through `unnest`); what
    they store must be what SQLite stores one event at a time."""
    _history, order = delivery
    events = [charge_only(e) for e in order]
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    batched = create_engine(postgres_url)
    try:
        with transaction(batched) as connection:
            for table in (effects, invoice_transitions, charge_links, invoices):
                connection.execute(table.delete())
        with scratch_sqlite() as one_by_one:
            refused_alone = apply_in(one_by_one, [[e] for e in events])
            refused_batched = apply_in(batched, batches)
            assert refused_batched == refused_alone
            assert stored(batched) == stored(one_by_one)
    finally:
        batched.dispose()


def test_a_long_batch_stores_what_one_at_a_time_stores(engine: Engine) -> None:
    """A batch of over a hundred rows per table, as replay's groups and the worker's batches
    write them; the outbox counts only the keys it did not hold."""
    count = 107
    paids = [paid(f"in_{n:03}", f"ch_{n:03}", f"e_paid_{n}") for n in range(count)]
    refunds = [
        BillingEvent(
            source="standard",
            event_id=f"e_refund_{n}",
            type=EventKind.REFUNDED,
            raw_type="charge.refunded",
            occurred_at=NOW + 1,
            invoice_id=None,
            charge_id=f"ch_{n:03}",
            refunds=(Refund(f"re_{n}", 100),),
        )
        for n in range(0, count, 2)
    ]
    events = [*paids, *refunds, *paids[:9]]
    with scratch_sqlite() as one_by_one:
        apply_in(one_by_one, [[e] for e in events])
        apply_in(engine, [events])
        assert stored(engine) == stored(one_by_one)
    rows = effect_rows(
        [apply(None, e).effects[0] for e in paids[:53]],
        invoice_id=None,
        event_pk=None,
        now=NOW,
        settings=SETTINGS,
    )
    fresh = effect_rows(
        [
            replace(apply(None, e).effects[0], idempotency_key=f"new:{n}")
            for n, e in enumerate(paids)
        ],
        invoice_id=None,
        event_pk=None,
        now=NOW,
        settings=SETTINGS,
    )
    with transaction(engine) as connection:
        assert insert_effects(connection, rows) == 0  # every key already in the outbox
        assert insert_effects(connection, [*rows[:5], *fresh, *rows[5:]]) == len(fresh)


def paid(invoice: str, charge: str, event_id: str) -> BillingEvent:
    return BillingEvent(
        source="standard",
        event_id=event_id,
        type=EventKind.PAID,
        raw_type="invoice.paid",
        occurred_at=NOW,
        invoice_id=invoice,
        charge_id=charge,
        status="paid",
        currency="eur",
        amount_due=500,
        amount_paid=500,
        customer_email="ada@example.com",
    )


def test_a_refused_event_fails_alone_and_a_batch_sees_its_own_links(engine: Engine) -> None:
    refund = BillingEvent(
        source="standard",
        event_id="e_refund",
        type=EventKind.REFUNDED,
        raw_type="charge.refunded",
        occurred_at=NOW + 1,
        invoice_id=None,
        charge_id="ch_1",
        refunds=(Refund("re_1", 500),),
    )
    orphan = replace(refund, event_id="e_orphan", charge_id="ch_unknown")
    batch = [paid("in_1", "ch_1", "e_paid"), refund, orphan, paid("in_2", "ch_2", "e_paid2")]
    with transaction(engine) as connection:
        outcomes = apply_events(
            connection, [Arrived(e, "standard", None) for e in batch], settings=SETTINGS, now=NOW
        )
    assert [type(o).__name__ for o in outcomes] == [
        "NoneType",
        "NoneType",
        "InvoiceNotYetKnown",
        "NoneType",
    ]
    assert "ch_unknown" in str(outcomes[2])
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(invoices.c.id, invoices.c.status)).all())
        keys = set(connection.execute(sa.select(effects.c.idempotency_key)).scalars())
    assert statuses == {"in_1": "refunded", "in_2": "paid"}
    assert keys == {"payment_receipt:in_1", "refund_notice:in_1:re_1", "payment_receipt:in_2"}


@pytest.mark.parametrize("refund_follows", [False, True])
def test_a_charge_already_linked_keeps_its_invoice(engine: Engine, refund_follows: bool) -> None:
    """A later invoice naming a charge already linked (links are read only for events that
    name no invoice) leaves the stored link alone, and a refund of that charge in the same
    batch goes to the first invoice."""
    with transaction(engine) as connection:
        apply_events(
            connection,
            [Arrived(paid("in_1", "ch_1", "e1"), "standard", None)],
            settings=SETTINGS,
            now=NOW,
        )
    refund = BillingEvent(
        source="standard",
        event_id="e_refund",
        type=EventKind.REFUNDED,
        raw_type="charge.refunded",
        occurred_at=NOW + 1,
        invoice_id=None,
        charge_id="ch_1",
        refunds=(Refund("re_1", 500),),
    )
    batch = [paid("in_2", "ch_1", "e2"), *([refund] if refund_follows else [])]
    with transaction(engine) as connection:
        outcomes = apply_events(
            connection, [Arrived(e, "standard", None) for e in batch], settings=SETTINGS, now=NOW
        )
    assert outcomes == [None] * len(batch)
    with engine.connect() as connection:
        links = dict(
            connection.execute(sa.select(charge_links.c.charge_id, charge_links.c.invoice_id)).all()
        )
        statuses = dict(connection.execute(sa.select(invoices.c.id, invoices.c.status)).all())
    assert links == {"ch_1": "in_1"}
    assert statuses == {"in_1": "refunded" if refund_follows else "paid", "in_2": "paid"}


def test_an_invoice_created_by_another_writer_refuses_the_whole_batch(engine: Engine) -> None:
    with transaction(engine) as connection:
        apply_events(
            connection,
            [Arrived(paid("in_1", "ch_1", "e1"), "standard", None)],
            settings=SETTINGS,
            now=NOW,
        )
    # A writer that read before in_1 existed: its insert must not silently win or vanish.
    with pytest.raises(ConcurrentUpdate), transaction(engine) as connection:
        state = apply(None, paid("in_1", "ch_1", "e1")).state
        insert_invoices(
            connection,
            [{"id": "in_1", "source": "standard", **invoice_columns(state, None, NOW)}],
            now=NOW,
        )
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(invoices)).scalar() == 1
