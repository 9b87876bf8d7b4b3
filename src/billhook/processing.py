"""Processing stored events: read and parse them, then apply and mark them in one transaction.

The `process_event` job handler. For one job, or for a batch the worker claimed together, it
reads the raw bodies in one statement and parses each into the canonical event (`prepare`,
before the write transaction: stored events never change), then, in one transaction, hands the
parsed events to `billhook.applying` (resolve the invoice, apply the pure model, write invoice
under a version check + transitions + outbox rows) and marks each event processed or ignored.

It is safe to run any number of times for the same event: the model is idempotent (applying an
event twice changes nothing the second time) and the outbox refuses a key it already holds. That
is what makes worker crashes, provider duplicates and operator replays harmless.

`handle_process_event(engine, job)` and `on_job_dead(connection, job)` are the names the queue's
default registry runs; `Processor(settings)` is the same handler with explicit settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import lru_cache

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billhook.applying import DEAD_JOB_MARK, Arrived, apply_events
from billhook.billing import BillingEvent, UnprocessableEvent, parse_event
from billhook.config import Settings, load_settings
from billhook.errors import NotFound
from billhook.queue.jobs import Job
from billhook.store.engine import among_per_dialect, reading, transaction
from billhook.store.events import mark_outcomes
from billhook.store.invoices import invoice_for_charge
from billhook.store.schema import events, invoices

# Built once with bind parameters (building a statement per event cost more than running it).
_LOAD_EVENTS = tuple(
    sa.select(events.c.id, events.c.source, events.c.body).where(among)
    for among in among_per_dialect(events.c.id, sa.BigInteger())
)


class Processor:
    """The `process_event` handler, bound to its settings."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock

    def __call__(self, engine: Engine, job: Job) -> None:
        if job.event_pk is None:
            return
        prepared = self.prepare(engine, [job])
        with transaction(engine) as connection:
            failure = prepared.run(connection).get(job.id)
            if failure is not None:
                raise failure

    def run_in(self, connection: Connection, job: Job) -> None:
        """Process `job`'s event inside the caller's transaction."""
        failure = self.run_many(connection, [job]).get(job.id)
        if failure is not None:
            raise failure

    def prepare(self, engine: Engine, jobs: Sequence[Job]) -> PreparedEvents:
        """Read and parse the events of `jobs` before the transaction that applies them.

        Stored events are never rewritten, so this reads what that transaction would; parsing
        them (the JSON and the model's parse: a fifth of a batch's time) then holds neither
        SQLite's one write lock nor PostgreSQL's invoice row locks."""
        with reading(engine) as connection:
            return self.prepare_in(connection, jobs)

    def prepare_in(self, connection: Connection, jobs: Sequence[Job]) -> PreparedEvents:
        """`prepare` on the caller's connection (inside its transaction)."""
        wanted = [job.event_pk for job in jobs if job.event_pk is not None]
        rows = {
            row.id: (row.source, bytes(row.body))
            for row in connection.execute(
                _LOAD_EVENTS[connection.dialect.name == "postgresql"], {"ids": wanted}
            )
        }
        parsed: dict[int, tuple[str, BillingEvent | None] | Exception] = {}
        for job in jobs:
            if job.event_pk is None:
                continue
            stored = rows.get(job.event_pk)
            if stored is None:
                parsed[job.id] = NotFound(f"event {job.event_pk} is not in the store")
                continue
            try:
                parsed[job.id] = (stored[0], decode_event(*stored))
            except UnprocessableEvent as exc:
                parsed[job.id] = exc
        return PreparedEvents(self, jobs, parsed)

    def run_many(self, connection: Connection, jobs: Sequence[Job]) -> dict[int, Exception]:
        """Process the events of `jobs`, in order, inside the caller's transaction (see
        `PreparedEvents.run`)."""
        return self.prepare_in(connection, jobs).run(connection)

    def apply_events(
        self, connection: Connection, batch: Sequence[Arrived]
    ) -> list[Exception | None]:
        """Apply parsed events in order inside the caller's transaction (replay's groups)."""
        return apply_events(connection, batch, settings=self.settings, now=self.clock())

    def apply_event(
        self, connection: Connection, event: BillingEvent, *, source: str, event_pk: int | None
    ) -> None:
        """Apply one parsed event inside the caller's transaction."""
        (failure,) = apply_events(
            connection, [Arrived(event, source, event_pk)], settings=self.settings, now=self.clock()
        )
        if failure is not None:
            raise failure


class PreparedEvents:
    """The parsed events of a batch of jobs (`Processor.prepare`), to apply in a transaction."""

    def __init__(
        self,
        processor: Processor,
        jobs: Sequence[Job],
        parsed: dict[int, tuple[str, BillingEvent | None] | Exception],
    ) -> None:
        self._processor = processor
        self._jobs = jobs
        self._parsed = parsed  # by job id: (source, event or None if ignored), or why not

    def run(self, connection: Connection) -> dict[int, Exception]:
        """Apply the events in order and mark them, inside the caller's transaction.

        Returns the jobs whose event was missing, unreadable or refused by the model (nothing
        of theirs is written); raises, having written part of the batch, when the database
        refuses: roll back then."""
        now = self._processor.clock()
        failures: dict[int, Exception] = {}
        batch: list[Arrived] = []
        owners: list[Job] = []
        processed: list[int] = []
        ignored: list[int] = []
        for job in self._jobs:
            if job.event_pk is None:
                continue
            parsed = self._parsed[job.id]
            if isinstance(parsed, Exception):
                failures[job.id] = parsed
                continue
            source, event = parsed
            if event is None:
                ignored.append(job.event_pk)
                continue
            batch.append(Arrived(event, source, job.event_pk))
            owners.append(job)
        outcomes = apply_events(connection, batch, settings=self._processor.settings, now=now)
        for job, outcome in zip(owners, outcomes, strict=True):
            if outcome is None:
                assert job.event_pk is not None
                processed.append(job.event_pk)
            else:
                failures[job.id] = outcome
        mark_outcomes(connection, processed, "processed", now=now)
        mark_outcomes(connection, ignored, "ignored", now=now)
        return failures


def decode_event(source: str, body: bytes) -> BillingEvent | None:
    """The canonical event of a stored raw body; None for types billing ignores."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UnprocessableEvent(f"stored body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UnprocessableEvent("stored body is not a JSON object")
    return parse_event(source, payload)


@lru_cache(maxsize=1)
def _default_processor() -> Processor:
    return Processor(load_settings())


class _DefaultHandler:
    """The default `process_event` handler: settings from the environment of this process.

    Callable as a plain handler (`handler(engine, job)`), and with `prepare(engine, jobs)` so
    the worker can run a claimed batch in one transaction."""

    def __call__(self, engine: Engine, job: Job) -> None:
        _default_processor()(engine, job)

    def prepare(self, engine: Engine, jobs: Sequence[Job]) -> PreparedEvents:
        return _default_processor().prepare(engine, jobs)


handle_process_event = _DefaultHandler()


def on_job_dead(connection: Connection, job: Job) -> None:
    """A dead job's event is marked failed and its invoice, when known, flagged for a person."""
    if job.event_pk is None:
        return
    now = time.time()
    mark_outcomes(connection, [job.event_pk], "failed", now=now)
    key = job.ordering_key
    if key.startswith("charge:"):
        resolved = invoice_for_charge(connection, key.removeprefix("charge:"))
        if resolved is None:
            return
        key = resolved
    elif key.startswith("event:"):
        return
    flag = f"{DEAD_JOB_MARK} {job.id} (event {job.event_pk}): {job.last_error or 'no error kept'}"
    current = connection.execute(
        sa.select(invoices.c.attention).where(invoices.c.id == key)
    ).scalar_one_or_none()
    combined = "; ".join(part for part in (current, flag) if part)
    connection.execute(
        invoices.update().where(invoices.c.id == key).values(attention=combined, updated_at=now)
    )
