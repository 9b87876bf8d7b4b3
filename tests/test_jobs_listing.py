"""Listing the jobs of one ordering key, on both databases (jobs have no plain key index)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from billhook.ops.jobs import list_jobs
from billhook.queue.jobs import enqueue
from billhook.sources import IncomingEvent
from billhook.store.engine import transaction
from billhook.store.events import Arrival, record_many


def _event(event_id: str, key: str) -> IncomingEvent:
    return IncomingEvent(
        source="stripe",
        event_id=event_id,
        type="invoice.paid",
        ordering_key=key,
        occurred_at=1000.0,
        headers={},
        body=b"{}",
    )


def test_jobs_of_a_key_come_from_its_events_and_from_jobs_without_an_event(
    engine: Engine,
) -> None:
    record_many(
        engine,
        [Arrival(_event(f"evt_{n}", "in_a" if n % 2 else "in_b"), 2000.0 + n) for n in range(6)],
        now=2010.0,
        max_attempts=3,
    )
    with transaction(engine) as connection:
        eventless_a = enqueue(
            connection, ordering_key="in_a", order_ts=1.0, now=2011.0, max_attempts=3, kind="other"
        )
        enqueue(connection, ordering_key="in_c", order_ts=1.0, now=2011.0, max_attempts=3)

    page = list_jobs(engine, ordering_key="in_a")
    assert [job.ordering_key for job in page.items] == ["in_a"] * 4
    assert page.items[0].id == eventless_a  # newest first
    assert sorted(job.kind for job in page.items) == ["other", *["process_event"] * 3]

    first = list_jobs(engine, ordering_key="in_b", limit=2)
    rest = list_jobs(engine, ordering_key="in_b", limit=2, cursor=first.next_cursor)
    assert len(first.items) == 2 and len(rest.items) == 1 and rest.next_cursor is None
    assert {job.id for job in first.items}.isdisjoint(job.id for job in rest.items)

    assert list_jobs(engine, ordering_key="in_none").items == []
    assert len(list_jobs(engine).items) == 8
