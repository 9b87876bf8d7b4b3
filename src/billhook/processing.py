"""Processing stored events: read and parse them, then apply and mark them in one transaction.

The `process_event` job handler. For one job, or for a batch the worker claimed together, it
reads the raw bodies in one statement, parses each into the canonical event and plans what
applying them writes (`billhook.applying`: resolve the invoice, apply the pure model), then, in
one transaction, writes the plan (invoice under a version check + transitions + outbox rows)
and marks each event processed or ignored. A worker's batch prepares before that transaction
(`prepare`: stored events never change, and a moved invoice fails the version check); one job
alone prepares inside it (`run_in`), so it never loses such a race.

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

from billhook.applying import DEAD_JOB_MARK, Arrived, Plan, apply_events, plan_events, write_plan
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
        # Planned inside its transaction, unlike a batch (`prepare`): a job alone cannot lose
        # the version race, so a batch refused for one falls back to this.
        with transaction(engine) as connection:
            self.run_in(connection, job)

    def run_in(self, connection: Connection, job: Job) -> None:
        """Process `job`'s event inside the caller's transaction."""
        failure = self.prepare_in(connection, [job]).run(connection).get(job.id)
        if failure is not None:
            raise failure

    def prepare(self, engine: Engine, jobs: Sequence[Job]) -> PreparedEvents:
        """Read, parse and plan the events of `jobs` before the transaction that writes them.

        Stored events never change, and the plan's writes are version-checked, so this needs
        no lock: SQLite's one write lock is then held for the writes alone, and PostgreSQL's
        invoice rows are not locked while the model runs. (Pipeline benchmark, SQLite: a
        batch held the write lock 11.5-12.5 ms before, 6.4-6.8 after.) If an invoice moves in
        between, `run` raises `ConcurrentUpdate` and the worker runs each job alone
        (`__call__`), which plans inside its transaction."""
        with reading(engine) as connection:
            return self._prepare(connection, jobs, lock=False)

    def prepare_in(self, connection: Connection, jobs: Sequence[Job]) -> PreparedEvents:
        """`prepare` inside the caller's transaction, the invoices read under row locks."""
        return self._prepare(connection, jobs, lock=True)

    def _prepare(
        self, connection: Connection, jobs: Sequence[Job], *, lock: bool
    ) -> PreparedEvents:
        now = self.clock()
        wanted = [job.event_pk for job in jobs if job.event_pk is not None]
        rows = {
            row.id: (row.source, bytes(row.body))
            for row in connection.execute(
                _LOAD_EVENTS[connection.dialect.name == "postgresql"], {"ids": wanted}
            )
        }
        failures: dict[int, Exception] = {}
        batch: list[Arrived] = []
        owners: list[Job] = []
        processed: list[int] = []
        ignored: list[int] = []
        for job in jobs:
            if job.event_pk is None:
                continue
            stored = rows.get(job.event_pk)
            if stored is None:
                failures[job.id] = NotFound(f"event {job.event_pk} is not in the store")
                continue
            try:
                event = decode_event(*stored)
            except UnprocessableEvent as exc:
                failures[job.id] = exc
                continue
            if event is None:
                ignored.append(job.event_pk)
                continue
            batch.append(Arrived(event, stored[0], job.event_pk))
            owners.append(job)
        plan = plan_events(connection, batch, settings=self.settings, now=now, lock=lock)
        for job, outcome in zip(owners, plan.outcomes, strict=True):
            if outcome is None:
                assert job.event_pk is not None
                processed.append(job.event_pk)
            else:
                failures[job.id] = outcome
        return PreparedEvents(plan, processed, ignored, failures)

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
    """A batch of jobs' events, parsed and planned (`Processor.prepare`), to write."""

    def __init__(
        self,
        plan: Plan,
        processed: list[int],
        ignored: list[int],
        failures: dict[int, Exception],
    ) -> None:
        self._plan = plan
        self._processed = processed  # event pks
        self._ignored = ignored
        self._failures = failures  # by job id: missing, unreadable, or refused by the model

    def run(self, connection: Connection) -> dict[int, Exception]:
        """Write the plan and mark the events, inside the caller's transaction.

        Returns the jobs whose event was missing, unreadable or refused by the model (nothing
        of theirs is written); raises, having written part of the batch, when the database
        refuses (`ConcurrentUpdate`: an invoice moved since it was read): roll back then."""
        write_plan(connection, self._plan)
        mark_outcomes(connection, self._processed, "processed", now=self._plan.now)
        mark_outcomes(connection, self._ignored, "ignored", now=self._plan.now)
        return dict(self._failures)


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
