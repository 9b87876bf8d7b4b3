"""Replay on real SQLite and PostgreSQL: dry runs write nothing, replays send nothing twice,
`--rebuild` mends a corrupted invoice, `--resend-effects` is explicit and audited, and the CLI's
exit codes hold through a real `python -m billhook` process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.billing import apply, parse_event
from billhook.config import load_settings
from billhook.errors import InvalidRequest, NotFound
from billhook.ops import audit
from billhook.ops.replay import (
    EXIT_EVENTS_FAILED,
    EXIT_WOULD_CHANGE,
    FieldChange,
    ReplayRequest,
    ReplayResult,
    Selection,
    parse_time,
    replay,
)
from billhook.processing import Processor
from billhook.queue.jobs import Job
from billhook.sources import IncomingEvent
from billhook.store.engine import create_engine, transaction
from billhook.store.events import Arrival, record_many
from billhook.store.schema import (
    audit_log,
    effect_attempts,
    effects,
    events,
    invoice_transitions,
    invoices,
    jobs,
    metadata,
)

T = TypeVar("T")
BASE = 1_700_000_000.0
INVOICE = "inv_1"
ALL = Selection(since=0)

E1 = {
    "id": "e1",
    "type": "invoice.finalized",
    "occurred_at": BASE,
    "data": {"invoice_id": INVOICE, "status": "open", "currency": "eur", "amount_due": 5000},
}
E2 = {
    "id": "e2",
    "type": "invoice.paid",
    "occurred_at": BASE + 10,
    "data": {
        "invoice_id": INVOICE,
        "status": "paid",
        "currency": "eur",
        "amount_due": 5000,
        "amount_paid": 5000,
        "customer_email": "ada@example.com",
    },
}
E3 = {
    "id": "e3",
    "type": "invoice.refunded",
    "occurred_at": BASE + 20,
    "data": {"invoice_id": INVOICE, "refund": {"id": "re_1", "amount": 2000}},
}
IGNORED = {
    "id": "x1",
    "type": "customer.created",
    "occurred_at": BASE + 30,
    "data": {"invoice_id": INVOICE},
}


# -- helpers (also used by test_replay_api.py) -------------------------------------------------


def store(engine: Engine, *payloads: Mapping[str, Any], body: bytes | None = None) -> None:
    now = time.time()
    arrivals = [
        Arrival(
            IncomingEvent(
                source="standard",
                event_id=str(payload["id"]),
                type=str(payload["type"]),
                ordering_key=INVOICE,
                occurred_at=float(payload["occurred_at"]),
                headers={},
                body=body if body is not None else orjson.dumps(payload),
            ),
            now,
        )
        for payload in payloads
    ]
    record_many(engine, arrivals, now=now, max_attempts=3)


def process(engine: Engine, *event_ids: str) -> None:
    """Run the worker's handler on the jobs of these events (the queue is not under test)."""
    processor = Processor(load_settings(database_url=str(engine.url)))
    with engine.connect() as connection:
        rows = (
            connection.execute(
                sa.select(jobs)
                .join(events, events.c.id == jobs.c.event_pk)
                .where(events.c.event_id.in_(event_ids))
                .order_by(jobs.c.order_ts)
            )
            .mappings()
            .all()
        )
    assert len(rows) == len(event_ids)
    for row in rows:
        processor(engine, Job.from_row(row))


def mark_sent(engine: Engine) -> None:
    """What the dispatcher leaves behind once every effect went out."""
    with transaction(engine) as connection:
        for effect_id in connection.execute(sa.select(effects.c.id)).scalars():
            connection.execute(
                effect_attempts.insert().values(
                    effect_id=effect_id,
                    attempt=1,
                    started_at=BASE,
                    finished_at=BASE,
                    outcome="sent",
                )
            )
        connection.execute(effects.update().values(state="sent", attempts=1, sent_at=BASE))


def checksums(engine: Engine) -> dict[str, tuple[int, str]]:
    """Row count and content hash of every billhook table."""
    sums: dict[str, tuple[int, str]] = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            rows = connection.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            digest = hashlib.sha256(repr([tuple(row) for row in rows]).encode()).hexdigest()
            sums[table.name] = (len(rows), digest)
    return sums


def cli_perform(engine: Engine) -> Any:
    def perform(action: str, params: Mapping[str, Any], operation: Callable[[], T]) -> T:
        return audit.perform(
            engine, actor="cli:test", action=action, params=params, operation=operation
        )

    return perform


def run(engine: Engine, selection: Selection = ALL, **options: Any) -> ReplayResult:
    return replay(
        engine,
        ReplayRequest(selection, **options),
        settings=load_settings(database_url=str(engine.url)),
        perform=cli_perform(engine),
    )


def invoice(engine: Engine) -> Any:
    with engine.connect() as connection:
        return connection.execute(sa.select(invoices).where(invoices.c.id == INVOICE)).one()


def audit_rows(engine: Engine, action: str) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(audit_log).where(audit_log.c.action == action).order_by(audit_log.c.id)
            ).mappings()
        )


# -- tests -------------------------------------------------------------------------------------


def test_a_dry_run_changes_nothing_and_says_whether_a_replay_would(engine: Engine) -> None:
    store(engine, E1, E2, E3)
    process(engine, "e1", "e2")  # the refund is stored but not processed yet
    before = checksums(engine)

    preview = run(engine, dry_run=True)

    assert checksums(engine) == before
    assert (preview.events, preview.invoices, preview.exit_code) == (3, 1, EXIT_WOULD_CHANGE)
    [diff] = preview.diffs
    assert FieldChange("status", "paid", "partially_refunded") in diff.changes
    assert FieldChange("amount_refunded", 0, 2000) in diff.changes
    assert [e.idempotency_key for e in diff.new_effects] == [f"refund_notice:{INVOICE}:re_1"]

    done = run(engine)
    assert (done.applied, done.failed, done.exit_code) == (3, (), 0)
    assert invoice(engine).status == "partially_refunded"

    settled = checksums(engine)
    again = run(engine, dry_run=True)
    assert (again.changed, again.exit_code, again.diffs, again.unchanged) == (False, 0, (), 1)
    assert checksums(engine) == settled


def test_replaying_every_stored_event_sends_nothing_again(engine: Engine) -> None:
    store(engine, E1, E2, E3, IGNORED)
    store(engine, {"id": "bad", "type": "invoice.paid", "occurred_at": BASE}, body=b"not json")
    process(engine, "e1", "e2", "e3", "x1")
    mark_sent(engine)
    outbox = {name: checksums(engine)[name] for name in ("effects", "effect_attempts")}
    row = invoice(engine)

    result = run(engine)

    assert (result.events, result.applied, result.ignored) == (5, 3, 1)
    # A broken event is reported and the run goes on; the exit code says some failed.
    assert [f.event_id for f in result.failed] == ["bad"] and "JSON" in result.failed[0].error
    assert result.exit_code == EXIT_EVENTS_FAILED
    assert {name: checksums(engine)[name] for name in outbox} == outbox
    assert invoice(engine) == row  # same version: nothing to write
    [entry] = audit_rows(engine, "replay")
    assert entry["actor"] == "cli:test"
    assert entry["outcome"] == (
        "ok: 5 events, 3 applied, 1 ignored, 1 failed, 0 effects reset for resend"
    )
    assert orjson.loads(entry["params"])["events"] == 5


def test_rebuild_mends_a_corrupted_invoice_and_shows_the_repair_first(engine: Engine) -> None:
    store(engine, E1, E2)
    process(engine, "e1", "e2")
    good = invoice(engine)
    event = parse_event("standard", E1)
    assert event is not None
    wrong = orjson.dumps(apply(None, event).state.to_dict()).decode()  # as if e2 got lost
    with transaction(engine) as connection:
        connection.execute(invoices.update().values(status="open", amount_paid=0, state=wrong))
        # ...and the receipt the old version forgot to enqueue.
        connection.execute(effects.delete())
    corrupted = checksums(engine)
    by_invoice = Selection(invoice_id=INVOICE)

    preview = run(engine, by_invoice, rebuild=True, dry_run=True)

    assert checksums(engine) == corrupted
    assert preview.exit_code == EXIT_WOULD_CHANGE
    [diff] = preview.diffs
    assert diff.changes[0] == FieldChange("status", "open", "paid")
    assert FieldChange("amount_paid", 0, 5000) in diff.changes
    assert [e.idempotency_key for e in diff.new_effects] == [f"payment_receipt:{INVOICE}"]

    done = run(engine, by_invoice, rebuild=True)

    mended = invoice(engine)
    assert (mended.status, mended.amount_paid, mended.state) == ("paid", 5000, good.state)
    assert mended.version == good.version + 1
    with engine.connect() as connection:
        keys = connection.execute(sa.select(effects.c.idempotency_key)).scalars().all()
        story = connection.execute(
            sa.select(invoice_transitions).order_by(invoice_transitions.c.id.desc()).limit(1)
        ).one()
    assert keys == [f"payment_receipt:{INVOICE}"]
    assert story.reason.startswith("rebuilt by replay from 2 events (status: open → paid")
    assert (story.from_status, story.to_status, story.event_pk) == ("open", "paid", None)
    assert done.rebuilt and done.applied == 2
    assert run(engine, by_invoice, rebuild=True, dry_run=True).exit_code == 0


def test_resend_effects_puts_back_only_the_chosen_kind_under_the_same_key(engine: Engine) -> None:
    store(engine, E1, E2, E3)
    process(engine, "e1", "e2", "e3")
    mark_sent(engine)
    with engine.connect() as connection:
        sent = {row.idempotency_key: row.id for row in connection.execute(sa.select(effects))}
    notice = f"refund_notice:{INVOICE}:re_1"
    by_invoice = Selection(invoice_id=INVOICE)

    before = checksums(engine)
    preview = run(engine, by_invoice, resend_effects="refund_notice", dry_run=True)
    assert checksums(engine) == before
    assert preview.exit_code == EXIT_WOULD_CHANGE and preview.diffs[0].resend == (notice,)

    result = run(engine, by_invoice, resend_effects="refund_notice")

    assert result.resent == (notice,)
    with engine.connect() as connection:
        now = {
            row.idempotency_key: (row.id, row.state)
            for row in connection.execute(sa.select(effects))
        }
    assert now == {
        f"payment_receipt:{INVOICE}": (sent[f"payment_receipt:{INVOICE}"], "sent"),
        notice: (sent[notice], "pending"),
    }
    [entry] = audit_rows(engine, "resend_effects")
    assert orjson.loads(entry["params"])["idempotency_keys"] == [notice]
    assert (entry["actor"], entry["outcome"]) == ("cli:test", "ok")


def test_selections_are_checked_before_anything_runs(engine: Engine) -> None:
    store(engine, E1)
    with pytest.raises(NotFound, match="evt_missing"):
        run(engine, Selection(event_ids=("e1", "evt_missing")), dry_run=True)
    with pytest.raises(NotFound, match="inv_nope"):
        run(engine, Selection(invoice_id="inv_nope"), dry_run=True)
    with pytest.raises(InvalidRequest, match="--rebuild"):
        run(engine, Selection(event_ids=("e1",)), rebuild=True)
    with pytest.raises(InvalidRequest, match="exactly one"):
        run(engine, Selection(event_ids=("e1",), invoice_id=INVOICE))
    with pytest.raises(InvalidRequest, match="resend-effects"):
        run(engine, Selection(event_ids=("e1",)), resend_effects="everything")
    assert audit_rows(engine, "replay") == []
    assert run(engine, Selection(event_ids=("e1",)), dry_run=True).diffs[0].known is False


def test_times_are_iso_8601_or_epoch_seconds() -> None:
    assert parse_time("1700000000") == 1_700_000_000.0
    assert parse_time("1700000000.5") == 1_700_000_000.5
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000.0  # no zone: UTC
    assert parse_time("2023-11-15T00:13:20+02:00") == 1_700_000_000.0
    with pytest.raises(InvalidRequest, match="ISO 8601"):
        parse_time("yesterday")


def test_cli_exit_codes_through_a_real_process(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    store(engine, E1, E2, E3)
    process(engine, "e1", "e2")
    engine.dispose()
    env = {**os.environ, "BILLHOOK_DATABASE_URL": sqlite_url}

    def billhook(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "billhook", "replay", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    dry = billhook("--since", "2000-01-01T00:00:00Z", "--dry-run")
    assert dry.returncode == EXIT_WOULD_CHANGE, dry.stderr
    assert "selected 3 event(s) about 1 invoice(s)" in dry.stdout
    assert "status: paid → partially_refunded" in dry.stdout
    real = billhook("--since", "0", "--yes")
    assert real.returncode == 0, real.stderr + real.stdout
    assert "replayed: 3 applied" in real.stdout
    settled = billhook("--invoice", INVOICE, "--dry-run", "--json")
    assert settled.returncode == 0, settled.stderr
    assert orjson.loads(settled.stdout)["changed"] is False  # stdout is JSON only
    assert "selected 3 event(s) about 1 invoice(s)" in settled.stderr
