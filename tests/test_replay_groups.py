"""Replay applies changing events in groups of one transaction; one bad event spoils no group."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.ops import replay_apply
from billhook.ops.replay_selection import load_events
from billhook.store.engine import transaction
from billhook.store.schema import effects, event_outcomes, events, events_with_outcomes, invoices
from test_replay import E1, E2, INVOICE, process, run, store

OTHER = "inv_2"


def _about(payload: dict[str, object], invoice_id: str, event_id: str) -> dict[str, object]:
    data = dict(payload["data"])  # type: ignore[call-overload]
    data["invoice_id"] = invoice_id
    return {**payload, "id": event_id, "data": data}


def test_an_unreadable_invoice_fails_its_events_and_the_rest_of_the_group_is_applied(
    engine: Engine,
) -> None:
    store(engine, E1, E2)
    process(engine, "e1", "e2")
    with transaction(engine) as connection:
        connection.execute(invoices.update().values(state="not json"))
    store(engine, _about(E1, OTHER, "o1"), _about(E2, OTHER, "o2"))

    result = run(engine)

    assert replay_apply.GROUP >= 4  # all four events would fit one group
    assert result.applied == 2
    assert sorted(f.event_id for f in result.failed) == ["e1", "e2"]
    with engine.connect() as connection:
        status = connection.execute(
            sa.select(invoices.c.status).where(invoices.c.id == OTHER)
        ).scalar_one()
        keys = connection.execute(sa.select(effects.c.idempotency_key)).scalars().all()
        outcomes = dict(
            (row.event_id, row.outcome)
            for row in connection.execute(
                sa.select(events.c.event_id, event_outcomes.c.outcome).select_from(
                    events_with_outcomes
                )
            )
        )
    assert status == "paid"
    assert sorted(keys) == sorted([f"payment_receipt:{INVOICE}", f"payment_receipt:{OTHER}"])
    assert outcomes["o1"] == outcomes["o2"] == "processed"


def test_a_replay_run_twice_applies_each_group_once(engine: Engine) -> None:
    payloads = [_about(E2, f"inv_g{n}", f"g{n}") for n in range(7)]
    store(engine, *payloads)

    first = run(engine)
    second = run(engine)

    assert first.applied == second.applied == 7
    assert not first.failed and not second.failed
    with engine.connect() as connection:
        receipts = connection.execute(sa.select(sa.func.count()).select_from(effects)).scalar()
    assert receipts == 7


def test_stored_events_are_read_back_in_the_order_asked_bodies_as_stored(engine: Engine) -> None:
    """`load_events` reads with driver SQL (ids as one JSON text on SQLite, one array and
    binary results on PostgreSQL): bodies come back byte for byte, in the order of the ids
    asked, unknown ids left out."""
    store(engine, E1, E2)
    with engine.connect() as connection:
        stored = dict(connection.execute(sa.select(events.c.event_id, events.c.id)).all())
        bodies = dict(connection.execute(sa.select(events.c.id, events.c.body)).all())
        asked = [stored["e2"], 10_000, stored["e1"], stored["e2"]]
        loaded = load_events(connection, asked)
        assert load_events(connection, []) == []
    assert [e.event_id for e in loaded] == ["e2", "e1", "e2"]
    assert [e.body for e in loaded] == [bodies[e.pk] for e in loaded]
    assert all(type(e.body) is bytes and e.outcome is None for e in loaded)
    assert [e.type for e in loaded] == ["invoice.paid", "invoice.finalized", "invoice.paid"]
