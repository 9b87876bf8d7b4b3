"""The ingest write on both databases: event, delivery and job in one transaction; races."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.ops.events import EventSummary, list_events
from billhook.sources import IncomingEvent
from billhook.store.engine import transaction
from billhook.store.events import Arrival, record, record_many
from billhook.store.schema import deliveries, events, jobs


def _event(event_id: str = "evt_1", occurred_at: float | None = 1000.0) -> IncomingEvent:
    return IncomingEvent(
        source="stripe",
        event_id=event_id,
        type="invoice.paid",
        ordering_key="in_1",
        occurred_at=occurred_at,
        headers={"content-type": "application/json"},
        body=b'{"id": "' + event_id.encode() + b'"}',
    )


def _rows(engine: Engine, table: sa.Table) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as connection:
        return list(connection.execute(sa.select(table).order_by(table.c.id)).all())


def _summaries(engine: Engine) -> dict[str, EventSummary]:
    """What operators read: delivery count and last-seen time derived from the deliveries."""
    return {summary.event_id: summary for summary in list_events(engine).items}


def test_first_delivery_stores_event_delivery_and_job(engine: Engine) -> None:
    [result] = record_many(engine, [Arrival(_event(), 2000.0)], now=2001.0, max_attempts=7)
    assert result.status == "accepted" and result.enqueued
    [event] = _rows(engine, events)
    assert (event.source, event.event_id, event.type, event.ordering_key) == (
        "stripe",
        "evt_1",
        "invoice.paid",
        "in_1",
    )
    assert (event.occurred_at, event.received_at) == (1000.0, 2000.0)
    assert bytes(event.body) == b'{"id": "evt_1"}'
    summary = _summaries(engine)["evt_1"]
    assert (summary.delivery_count, summary.last_seen_at) == (1, 2000.0)
    assert orjson.loads(event.headers) == {"content-type": "application/json"}
    [delivery] = _rows(engine, deliveries)
    assert (delivery.event_pk, delivery.outcome) == (result.event_pk, "accepted")
    [job] = _rows(engine, jobs)
    assert (job.kind, job.event_pk, job.ordering_key, job.state) == (
        "process_event",
        result.event_pk,
        "in_1",
        "available",
    )
    assert (job.order_ts, job.attempts, job.max_attempts, job.run_at) == (1000.0, 0, 7, 2001.0)


def test_duplicate_counts_and_enqueues_nothing(engine: Engine) -> None:
    first, second = record_many(
        engine,
        [Arrival(_event(), 2000.0), Arrival(_event(), 2005.0)],
        now=2006.0,
        max_attempts=3,
    )
    [third] = record_many(engine, [Arrival(_event(), 2003.0)], now=2007.0, max_attempts=3)
    assert (first.status, second.status, third.status) == ("accepted", "duplicate", "duplicate")
    assert first.event_pk == second.event_pk == third.event_pk
    assert len(_rows(engine, events)) == 1
    summary = _summaries(engine)["evt_1"]
    assert summary.delivery_count == 3
    assert summary.last_seen_at == 2005.0  # a late, older delivery does not move it back
    assert [d.outcome for d in _rows(engine, deliveries)] == ["accepted", "duplicate", "duplicate"]
    assert len(_rows(engine, jobs)) == 1


def test_without_provider_time_the_job_orders_by_arrival(engine: Engine) -> None:
    record_many(engine, [Arrival(_event(occurred_at=None), 2000.0)], now=2001.0, max_attempts=3)
    [job] = _rows(engine, jobs)
    assert job.order_ts == 2000.0


def test_fifty_racing_transactions_store_one_event(engine: Engine) -> None:
    """Each thread has its own connection and transaction: the database settles the race."""
    barrier = threading.Barrier(50)

    def deliver(i: int) -> str:
        barrier.wait()
        with transaction(engine) as connection:
            return record(
                connection, Arrival(_event(), 2000.0 + i), now=2000.0 + i, max_attempts=3
            ).status

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(deliver, range(50)))
    assert sorted(statuses).count("accepted") == 1
    assert statuses.count("duplicate") == 49
    assert len(_rows(engine, events)) == 1
    assert _summaries(engine)["evt_1"].delivery_count == 50
    assert len(_rows(engine, deliveries)) == 50
    assert len(_rows(engine, jobs)) == 1


def test_one_batch_mixes_new_events_and_duplicates(engine: Engine) -> None:
    record_many(engine, [Arrival(_event("evt_c"), 1990.0)], now=1990.0, max_attempts=3)
    batch = [_event("evt_a"), _event("evt_b"), _event("evt_a"), _event("evt_c")]
    results = record_many(
        engine, [Arrival(e, 2000.0 + i) for i, e in enumerate(batch)], now=2010.0, max_attempts=3
    )
    assert [r.status for r in results] == ["accepted", "accepted", "duplicate", "duplicate"]
    assert results[0].event_pk == results[2].event_pk != results[1].event_pk
    by_id = {row.event_id: row for row in _rows(engine, events)}
    counts = {k: v.delivery_count for k, v in _summaries(engine).items()}
    assert counts == {"evt_a": 2, "evt_b": 1, "evt_c": 2}
    assert {row.event_pk for row in _rows(engine, jobs)} == {v.id for v in by_id.values()}
    assert [d.event_pk for d in _rows(engine, deliveries)][1:] == [r.event_pk for r in results]
