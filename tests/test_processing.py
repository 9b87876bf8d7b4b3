"""The processing shell on real databases: stored event -> invoice state, story and outbox rows."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.applying import InvoiceNotYetKnown
from billhook.billing import InvoiceState
from billhook.config import load_settings
from billhook.processing import PreparedEvents, Processor, on_job_dead
from billhook.queue.claims import claim, complete
from billhook.queue.jobs import Job
from billhook.queue.registry import Registry
from billhook.queue.worker import Worker, WorkerConfig
from billhook.sources import IncomingEvent
from billhook.store.engine import transaction
from billhook.store.events import Arrival, record_many
from billhook.store.invoices import ConcurrentUpdate, load_invoice, save_invoice
from billhook.store.schema import (
    effects,
    event_outcomes,
    events,
    events_with_outcomes,
    invoice_transitions,
    invoices,
    jobs,
)
from billhook.store.schema import settings as settings_table


@pytest.fixture
def processor(database_url: str) -> Processor:
    return Processor(load_settings(database_url=database_url))


def canonical(event_id: str, type_: str, at: float, **data: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": type_,
        "occurred_at": at,
        "data": {"invoice_id": "inv_1", **data},
    }


def deliver(engine: Engine, source: str, payload: dict[str, Any], key: str = "inv_1") -> None:
    body = orjson.dumps(payload)
    incoming = IncomingEvent(
        source=source,
        event_id=payload["id"],
        type=payload["type"],
        ordering_key=key,
        occurred_at=float(payload.get("occurred_at") or payload.get("created") or 0),
        headers={},
        body=body,
    )
    now = time.time()
    record_many(engine, [Arrival(incoming, now)], now=now, max_attempts=3)


def drain(engine: Engine, processor: Processor) -> list[tuple[Job, BaseException]]:
    """Run every claimable job once through the real claim/complete path; return failures."""
    failures: list[tuple[Job, BaseException]] = []
    seen: set[int] = set()
    while True:
        claimed = [
            job
            for job in claim(engine, worker_id="t", now=time.time(), lease_seconds=30, limit=10)
            if job.id not in seen
        ]
        if not claimed:
            return failures
        for job in claimed:
            seen.add(job.id)
            try:
                processor(engine, job)
            except Exception as exc:  # the queue would retry; the test inspects it
                failures.append((job, exc))
                with transaction(engine) as connection:
                    connection.execute(
                        jobs.update()
                        .where(jobs.c.id == job.id)
                        .values(state="completed", finished_at=time.time())
                    )
                continue
            assert complete(engine, job, now=time.time())


def invoice_row(engine: Engine, invoice_id: str = "inv_1") -> Any:
    with engine.connect() as connection:
        return connection.execute(sa.select(invoices).where(invoices.c.id == invoice_id)).one()


def effect_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(sa.select(effects.c.idempotency_key)).scalars())


def stories(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(invoice_transitions.c.reason).order_by(invoice_transitions.c.id)
            ).scalars()
        )


BASE = 1_700_000_000.0
PAID = dict(
    status="paid",
    currency="eur",
    amount_due=5000,
    amount_paid=5000,
    customer_email="ada@example.com",
)


def deliver_refund_before_payment(engine: Engine) -> None:
    """inv_1 finalized (open, 5000 eur), then refund re_1 of 5000 — no payment yet."""
    deliver(
        engine,
        "standard",
        canonical("e1", "invoice.finalized", BASE, status="open", currency="eur", amount_due=5000),
    )
    deliver(
        engine,
        "standard",
        canonical("e3", "invoice.refunded", BASE + 20, refund={"id": "re_1", "amount": 5000}),
    )


def test_refund_before_payment_and_triple_delivery(engine: Engine, processor: Processor) -> None:
    deliver_refund_before_payment(engine)
    assert drain(engine, processor) == []
    held = invoice_row(engine)
    assert held.status == "open" and held.amount_refunded == 0
    assert any("held" in story for story in stories(engine))
    for _ in range(3):
        deliver(engine, "standard", canonical("e2", "invoice.paid", BASE + 10, **PAID))
    assert drain(engine, processor) == []
    row = invoice_row(engine)
    assert (row.status, row.amount_paid, row.amount_refunded) == ("refunded", 5000, 5000)
    assert effect_keys(engine) == ["payment_receipt:inv_1", "refund_notice:inv_1:re_1"]
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(events)).scalar() == 3
        outcomes = set(
            connection.execute(
                sa.select(event_outcomes.c.outcome).select_from(events_with_outcomes)
            ).scalars()
        )
    assert outcomes == {"processed"}


def test_reprocessing_an_event_changes_nothing(engine: Engine, processor: Processor) -> None:
    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE, **PAID))
    drain(engine, processor)
    before = (invoice_row(engine), effect_keys(engine), stories(engine))
    with engine.connect() as connection:
        row = connection.execute(sa.select(jobs)).mappings().one()
    processor(engine, Job.from_row(row))  # what a crash after commit, or a replay, does
    assert (invoice_row(engine), effect_keys(engine), stories(engine)) == before


def test_events_are_read_and_parsed_while_another_writer_holds_the_database(
    engine: Engine, processor: Processor
) -> None:
    """`prepare` reads and parses a batch's events outside any write transaction: it does not
    wait for a writer that holds the database (on SQLite, the one write lock, which a worker's
    batch now holds for its writes alone), and the prepared batch applies them afterwards."""
    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE, **PAID))
    (job,) = claim(engine, worker_id="t", now=time.time(), lease_seconds=30, limit=10)
    holding, release = threading.Event(), threading.Event()

    def hold_the_database() -> None:
        with transaction(engine) as connection:
            connection.execute(
                sa.insert(settings_table).values(key="held", value="yes", updated_at=time.time())
            )
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_database)
    holder.start()
    try:
        assert holding.wait(5)
        if engine.dialect.name == "sqlite":
            # The lock is really held: another write transaction waits for it.
            began = threading.Event()

            def begin_writing() -> None:
                with transaction(engine):
                    began.set()

            threading.Thread(target=begin_writing, daemon=True).start()
            assert not began.wait(0.3)
        started = time.monotonic()
        prepared = processor.prepare(engine, [job])
        assert time.monotonic() - started < 2
    finally:
        release.set()
        holder.join()
    with transaction(engine) as connection:
        assert prepared.run(connection) == {}
    row = invoice_row(engine)
    assert (row.status, row.amount_paid) == ("paid", PAID["amount_paid"])


def test_a_batch_prepared_before_its_invoice_moved_writes_nothing(
    engine: Engine, processor: Processor
) -> None:
    """A batch is planned before its transaction; if one of its invoices changes in between,
    its writes are refused whole (the version check), and the job run alone, planned inside
    its transaction, applies the event on the state as it now is."""
    deliver(
        engine,
        "standard",
        canonical("e1", "invoice.finalized", BASE, status="open", currency="eur", amount_due=5000),
    )
    assert drain(engine, processor) == []
    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE + 10, **PAID))
    (job,) = claim(engine, worker_id="t", now=time.time(), lease_seconds=30, limit=10)
    prepared = processor.prepare(engine, [job])
    # Meanwhile another writer (a replay, an operator) moves the invoice.
    with engine.connect() as connection:
        seen = load_invoice(connection, "inv_1", lock=False)
    assert seen is not None
    with transaction(engine) as connection:
        save_invoice(
            connection, seen.state, source="standard", seen=seen, attention="moved", now=2.0
        )
    before = (invoice_row(engine), effect_keys(engine), stories(engine))
    with pytest.raises(ConcurrentUpdate), transaction(engine) as connection:
        prepared.run(connection)
    assert (invoice_row(engine), effect_keys(engine), stories(engine)) == before
    with engine.connect() as connection:
        assert connection.execute(sa.select(event_outcomes.c.event_pk)).scalars().all() == [1]

    processor(engine, job)
    row = invoice_row(engine)
    assert (row.status, row.amount_paid, row.version) == ("paid", PAID["amount_paid"], 3)
    assert effect_keys(engine) == ["payment_receipt:inv_1"]


def test_a_worker_batch_whose_invoice_moved_runs_each_job_alone(
    engine: Engine, database_url: str
) -> None:
    """The worker's side of the race above: the shared transaction is refused, nothing of it
    is kept, and each job of the batch then runs alone and completes."""

    class MovesAnInvoiceOnce(Processor):
        moved = False

        def prepare(self, engine: Engine, jobs: Sequence[Job]) -> PreparedEvents:
            prepared = super().prepare(engine, jobs)
            if not self.moved:  # another writer gets to inv_1 between plan and transaction
                self.moved = True
                with engine.connect() as connection:
                    seen = load_invoice(connection, "inv_1", lock=False)
                assert seen is not None
                with transaction(engine) as connection:
                    save_invoice(
                        connection, seen.state, source="standard", seen=seen, attention="moved",
                        now=2.0,
                    )
            return prepared

    settings = load_settings(database_url=database_url)
    deliver(
        engine,
        "standard",
        canonical("e1", "invoice.finalized", BASE, status="open", currency="eur", amount_due=5000),
    )
    assert drain(engine, Processor(settings)) == []
    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE + 10, **PAID))
    second = canonical("e3", "invoice.finalized", BASE, status="open", currency="eur")
    second["data"]["invoice_id"] = "inv_2"
    deliver(engine, "standard", second, key="inv_2")
    handler = MovesAnInvoiceOnce(settings)
    worker = Worker(engine, WorkerConfig(concurrency=10), Registry({"process_event": handler}))
    while worker.run_once():
        pass
    assert handler.moved
    with engine.connect() as connection:
        states = connection.execute(sa.select(jobs.c.state, jobs.c.attempts)).all()
    assert sorted(states) == [("completed", 1)] * 3
    assert (invoice_row(engine).status, invoice_row(engine, "inv_2").status) == ("paid", "open")
    # Created (1), moved (2), paid on the moved state (3): the batch's stale write left no trace.
    assert invoice_row(engine).version == 3
    assert effect_keys(engine) == ["payment_receipt:inv_1"]


def test_unknown_types_are_ignored(engine: Engine, processor: Processor) -> None:
    deliver(
        engine,
        "standard",
        {
            "id": "x1",
            "type": "customer.created",
            "occurred_at": BASE,
            "data": {"invoice_id": "inv_1"},
        },
    )
    assert drain(engine, processor) == []
    with engine.connect() as connection:
        assert connection.execute(sa.select(event_outcomes.c.outcome)).scalar() == "ignored"
        assert connection.execute(sa.select(sa.func.count()).select_from(invoices)).scalar() == 0


def _stripe(fixtures_dir: Path, name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((fixtures_dir / "stripe_events" / name).read_text()))


def test_stripe_refund_naming_only_its_charge_waits_for_the_link(
    engine: Engine, processor: Processor, fixtures_dir: Path
) -> None:
    refund = _stripe(fixtures_dir, "refund.created--stripe-sync-engine.json")
    refund["id"] = "evt_refund"
    charge_id = refund["data"]["object"]["charge"]
    deliver(engine, "stripe", refund, key=f"charge:{charge_id}")
    failures = drain(engine, processor)
    assert len(failures) == 1 and isinstance(failures[0][1], InvoiceNotYetKnown)
    assert charge_id in str(failures[0][1])

    paid = _stripe(fixtures_dir, "invoice.paid--stripe-sync-engine.json")
    invoice_id = paid["data"]["object"]["id"]
    charge = _stripe(fixtures_dir, "charge.refunded--stripe-sync-engine.json")
    charge["id"] = "evt_charge"
    charge["data"]["object"]["id"] = charge_id
    charge["data"]["object"]["invoice"] = invoice_id
    deliver(engine, "stripe", paid, key=invoice_id)
    deliver(engine, "stripe", charge, key=invoice_id)
    assert drain(engine, processor) == []
    # The refund's job, retried now, finds the invoice through the charge link.
    with engine.connect() as connection:
        job = (
            connection.execute(sa.select(jobs).where(jobs.c.ordering_key == f"charge:{charge_id}"))
            .mappings()
            .one()
        )
    processor(engine, Job.from_row(job))
    keys = effect_keys(engine)
    assert any(key.startswith(f"refund_notice:{invoice_id}:") for key in keys)


def test_a_stale_writer_loses(engine: Engine) -> None:
    state = InvoiceState("inv_9")
    with transaction(engine) as connection:
        save_invoice(connection, state, source="standard", seen=None, attention=None, now=1.0)
    with engine.connect() as connection:
        seen = load_invoice(connection, "inv_9", lock=False)
    assert seen is not None
    with transaction(engine) as connection:
        save_invoice(connection, state, source="standard", seen=seen, attention="x", now=2.0)
    with pytest.raises(ConcurrentUpdate), transaction(engine) as connection:
        save_invoice(connection, state, source="standard", seen=seen, attention="y", now=3.0)
    with pytest.raises(ConcurrentUpdate), transaction(engine) as connection:
        save_invoice(connection, state, source="standard", seen=None, attention=None, now=3.0)


def test_a_dead_job_flags_its_invoice(engine: Engine, processor: Processor) -> None:
    deliver(engine, "standard", canonical("e2", "invoice.paid", BASE, **PAID))
    drain(engine, processor)
    with engine.connect() as connection:
        row = connection.execute(sa.select(jobs)).mappings().one()
    job = Job.from_row({**row, "last_error": "UnprocessableEvent: no id"})
    with transaction(engine) as connection:
        on_job_dead(connection, job)
    assert "dead job" in invoice_row(engine).attention
    # Later processing keeps the flag until an operator clears it.
    deliver(engine, "standard", canonical("e4", "invoice.payment_failed", BASE + 1, attempt=1))
    drain(engine, processor)
    assert "dead job" in invoice_row(engine).attention


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield
