"""A Hypothesis state machine over the real pipeline: ingest's store write, the queue, the
processing shell with the billing model, and the effect dispatcher writing to a Maildir.

Events come from a few generated, valid Stripe histories (`billhook.sim.histories`, which also
knows each invoice's true end state and its expected effects). Rules deliver any event any
number of times in any order, run jobs, crash workers before or after processing (the job is
never completed: its lease runs out on a controllable clock and `rescue_expired` hands it back;
a stalled worker may also wake up and finish late),
run the dispatcher, kill the dispatcher between handing a message over and recording it, and
restart (a new engine). No sleeping: every `now` is the machine's clock.

After every step: no stored event is lost, no effect sits in the outbox under two keys, no
invoice's lifecycle goes backwards. At the end (teardown) every event is delivered once more,
everything is drained, and the simulator's own checker must find the true end states, each
expected effect once, and resends only under the same key and only after a dispatcher kill.
"""

from __future__ import annotations

import contextlib
import itertools
import mailbox
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import EffectDispatcher
from billhook.effects.mailer import MaildirMailer
from billhook.effects.render import OutgoingEmail
from billhook.processing import Processor, on_job_dead
from billhook.queue.claims import claim, complete, fail, rescue_expired
from billhook.queue.jobs import Job
from billhook.queue.retry import RetryPolicy
from billhook.sim.checker import DeliveryStats, Observation, ObservedEmail, check
from billhook.sim.classify import classify_email
from billhook.sim.histories import History, ProviderEvent, generate_histories
from billhook.sources import stripe
from billhook.store.engine import create_engine
from billhook.store.events import Arrival, record_many
from billhook.store.schema import (
    effects,
    event_outcomes,
    events,
    events_with_outcomes,
    invoices,
    jobs,
    metadata,
)

LEASE = 30.0
START = 1_700_100_000.0  # after every generated history (they start at 1_700_000_000 + <1 h)
MAX_ATTEMPTS = 100  # crashes use attempts up; no job may die of them within one example
RETRY = RetryPolicy(base_seconds=1.0, max_seconds=10.0, max_attempts=MAX_ATTEMPTS)
DEAD_HOOKS = {"process_event": on_job_dead}
UNFINISHED_JOBS = ("available", "running", "retryable")
UNFINISHED_EFFECTS = ("pending", "sending", "retryable")
# The lifecycle's order: paid never returns to open, refunds only accumulate.
RANK = {
    None: -1,
    "draft": 0,
    "open": 1,
    "uncollectible": 2,
    "void": 3,
    "paid": 4,
    "partially_refunded": 5,
    "refunded": 6,
}
STATE_FIELDS = ("status", "currency", "amount_due", "amount_paid", "amount_refunded", "disputed")

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


class _Killed(BaseException):
    """The dispatcher process dies: not an `Exception`, so nothing in billhook records it."""


class _DiesAfterHandOver:
    """The real Maildir mailer; after `after` messages the process dies before recording."""

    def __init__(self, path: Path, after: int) -> None:
        self._inner = MaildirMailer(path)
        self._left = after

    @property
    def description(self) -> str:
        return "maildir, then killed"

    def send(self, message: OutgoingEmail, *, sender: str, recipient: str) -> None:
        self._inner.send(message, sender=sender, recipient=recipient)
        self._left -= 1
        if self._left <= 0:
            raise _Killed()

    def close(self) -> None:
        return None


class PipelineMachine(RuleBasedStateMachine):
    """Subclassed per database kind with `fresh_database(workdir) -> url`."""

    fresh_database: ClassVar[Callable[[Path], str]]
    root: ClassVar[Path]
    _examples: ClassVar[Iterator[int]] = itertools.count()

    delivered_events = Bundle("events")

    def __init__(self) -> None:
        super().__init__()
        self.workdir = self.root / f"example-{next(self._examples)}"
        self.workdir.mkdir(parents=True)
        self.url = type(self).fresh_database(self.workdir)
        self.maildir = self.workdir / "data" / "maildir"
        self.settings = Settings(
            database_url=self.url,
            data_dir=str(self.workdir / "data"),
            lease_seconds=LEASE,
            retry_base_seconds=1.0,
            retry_max_seconds=10.0,
            max_attempts=MAX_ATTEMPTS,
        )
        self.engine: Engine = create_engine(self.url)
        self.now = START
        self.processor = Processor(self.settings, clock=lambda: self.now)
        self.rng = random.Random(0)
        self.histories: list[History] = []
        self.claims = 0
        self.dispatcher_kills = 0
        # A kill leaves every message of its batch unrecorded: those handed over before it
        # (`after` each) may reach the mailbox twice.
        self.handed_over_before_kills = 0
        self.delivered: set[str] = set()
        self.stalled: list[Job] = []  # claimed by workers that stopped (maybe only for a while)
        self.seen: dict[str, tuple[int, int, int]] = {}

    # -- rules ------------------------------------------------------------------------------

    @initialize(
        target=delivered_events,
        seed=st.integers(0, 2**20),
        count=st.integers(1, 3),
        first=st.lists(st.integers(0, 10**6), min_size=3, max_size=30),
    )
    def histories_of_the_day(self, seed: int, count: int, first: list[int]) -> Any:
        self.histories = generate_histories(seed, count, namespace="stateful")
        every = [event for h in self.histories for event in h.events]
        # Some events are in the store from the start: every rule has work from its first step
        # even when swarm testing switches `deliver` off for the example.
        if first:
            self._deliver([every[index % len(every)] for index in first])
        return multiple(*every)

    @rule(
        batch=st.lists(delivered_events, min_size=1, max_size=5),
        copies=st.integers(1, 2),
    )
    def deliver(self, batch: list[ProviderEvent], copies: int) -> None:
        self._deliver(batch * copies)

    @rule(workers=st.integers(1, 4))
    def run_jobs(self, workers: int) -> None:
        for _ in range(workers):
            job = self._claim()
            if job is not None:
                self._run(job)

    @rule()
    def worker_dies_before_processing(self) -> None:
        job = self._claim()  # only its lease can give the job back
        if job is not None:
            self.stalled.append(job)

    @rule()
    def worker_dies_after_processing(self) -> None:
        job = self._claim()
        if job is None:
            return
        with contextlib.suppress(Exception):  # died anyway: an error would not be recorded
            self.processor(self.engine, job)
        self.stalled.append(job)
        # no complete(): the job runs again after its lease, and processing must be idempotent

    @precondition(lambda self: self.stalled)
    @rule(pick=st.integers(0, 100))
    def stalled_worker_wakes_up(self, pick: int) -> None:
        """It was not dead, only stalled (GC pause, frozen VM): it finishes its attempt late.

        If its job was rescued and claimed again meanwhile, nothing it records may count.
        """
        job = self.stalled.pop(pick % len(self.stalled))
        self._run(job, may_have_lost_it=True)

    @rule(seconds=st.sampled_from([1.0, LEASE + 1]), rescue=st.booleans())
    def time_passes(self, seconds: float, rescue: bool) -> None:
        self.now += seconds
        if rescue:  # what a live worker's loop does now and then
            rescue_expired(self.engine, now=self.now, dead_hooks=DEAD_HOOKS)

    @rule()
    def dispatch(self) -> None:
        self._dispatcher().run_once()

    @rule(after=st.integers(1, 3))
    def dispatcher_dies_after_hand_over(self, after: int) -> None:
        dispatcher = self._dispatcher(_DiesAfterHandOver(self.maildir, after))
        try:
            dispatcher.run_once()
        except _Killed:
            self.dispatcher_kills += 1
            self.handed_over_before_kills += after

    @rule()
    def restart(self) -> None:
        self.engine.dispose()
        self.engine = create_engine(self.url)

    # -- invariants after every step --------------------------------------------------------

    @invariant()
    def no_stored_event_is_lost(self) -> None:
        with self.engine.connect() as connection:
            stored = {
                row.event_id: row
                for row in connection.execute(
                    sa.select(events.c.id, events.c.event_id, event_outcomes.c.outcome).select_from(
                        events_with_outcomes
                    )
                )
            }
            per_event = Counter(connection.execute(sa.select(jobs.c.event_pk)).scalars())
            job_rows = connection.execute(
                sa.select(jobs.c.event_pk, jobs.c.state, jobs.c.last_error)
            ).all()
        missing = self.delivered - stored.keys()
        assert not missing, f"delivered (2xx) but not stored: {sorted(missing)}"
        outcome = {row.id: row.outcome for row in stored.values()}
        assert all(per_event[row.id] == 1 for row in stored.values()), per_event
        for job in job_rows:
            if job.state == "completed":
                assert outcome[job.event_pk] in ("processed", "ignored"), (
                    f"job of event {job.event_pk} completed but the event is "
                    f"{outcome[job.event_pk]!r}"
                )
            if job.state == "dead":
                assert outcome[job.event_pk] == "failed" and job.last_error, job

    @invariant()
    def one_outbox_row_per_effect(self) -> None:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(effects.c.kind, effects.c.invoice_id, effects.c.payload)
            ).all()
        identities = Counter(_identity(row.kind, row.invoice_id, row.payload) for row in rows)
        twice = {key: n for key, n in identities.items() if n > 1}
        assert not twice, f"effects in the outbox under several keys: {twice}"

    @invariant()
    def lifecycle_never_goes_backwards(self) -> None:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    invoices.c.id,
                    invoices.c.status,
                    invoices.c.amount_paid,
                    invoices.c.amount_refunded,
                )
            ).all()
        for row in rows:
            now = (RANK[row.status], int(row.amount_paid), int(row.amount_refunded))
            before = self.seen.get(row.id, (-1, 0, 0))
            assert all(n >= b for n, b in zip(now, before, strict=True)), (
                f"invoice {row.id} went backwards: (rank, paid, refunded) {before} -> {now}"
            )
            self.seen[row.id] = now

    # -- the end: deliver everything, drain, compare with the truth -------------------------

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None and self.histories:
                self._deliver([e for h in self.histories for e in h.events])
                self._drain()
                self.no_stored_event_is_lost()
                self.one_outbox_row_per_effect()
                self.lifecycle_never_goes_backwards()
                self._converged_to_the_truth()
        finally:
            self.engine.dispose()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _drain(self) -> None:
        dispatcher = self._dispatcher()
        for _ in range(100):
            rescue_expired(self.engine, now=self.now, dead_hooks=DEAD_HOOKS)
            claimed = self._claim_many(limit=20)
            for job in claimed:
                self._run(job)
            sent = dispatcher.run_once()
            if claimed or sent:
                continue
            with self.engine.connect() as connection:
                busy = (
                    connection.execute(
                        sa.select(sa.func.count())
                        .select_from(jobs)
                        .where(jobs.c.state.in_(UNFINISHED_JOBS))
                    ).scalar_one()
                    + connection.execute(
                        sa.select(sa.func.count())
                        .select_from(effects)
                        .where(effects.c.state.in_(UNFINISHED_EFFECTS))
                    ).scalar_one()
                )
            if not busy:
                return
            self.now += LEASE + 1  # leases run out, backoffs come due
        with self.engine.connect() as connection:
            stuck: list[Any] = list(
                connection.execute(
                    sa.select(jobs.c.id, jobs.c.state, jobs.c.attempts, jobs.c.last_error).where(
                        jobs.c.state.in_(UNFINISHED_JOBS)
                    )
                )
            )
            stuck += connection.execute(
                sa.select(effects.c.idempotency_key, effects.c.state, effects.c.last_error).where(
                    effects.c.state.in_(UNFINISHED_EFFECTS)
                )
            ).all()
        raise AssertionError(f"the pipeline did not drain; still busy: {stuck}")

    def _converged_to_the_truth(self) -> None:
        with self.engine.connect() as connection:
            job_states = Counter(connection.execute(sa.select(jobs.c.state)).scalars())
            outcomes = Counter(
                connection.execute(
                    sa.select(event_outcomes.c.outcome).select_from(events_with_outcomes)
                ).scalars()
            )
            stored = frozenset(connection.execute(sa.select(events.c.event_id)).scalars())
            effect_states = Counter(connection.execute(sa.select(effects.c.state)).scalars())
            rows = {
                row.id: {name: getattr(row, name) for name in STATE_FIELDS}
                for row in connection.execute(sa.select(invoices))
            }
        assert set(job_states) == {"completed"}, job_states
        assert set(outcomes) <= {"processed", "ignored"}, outcomes
        assert set(effect_states) <= {"sent"}, effect_states
        every_id = frozenset(e.event_id for h in self.histories for e in h.events)
        report = check(
            self.histories,
            Observation(
                deliveries=DeliveryStats(
                    attempts=len(every_id),
                    acknowledged=len(every_id),
                    statuses={"200": len(every_id)},
                    acked_event_ids=every_id,
                ),
                invoices={h.invoice_id: rows.get(h.invoice_id) for h in self.histories},
                emails=_maildir_emails(self.maildir),
                stored_event_ids=stored,
            ),
        )
        assert report.ok, report.violations
        if self.dispatcher_kills == 0:
            assert report.resends == 0, "a message was sent twice without any crash"
        assert report.resends <= self.handed_over_before_kills, (
            report.resends,
            self.handed_over_before_kills,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _deliver(self, provider_events: list[ProviderEvent]) -> None:
        arrivals = []
        for event in provider_events:
            body = orjson.dumps(event.body)
            incoming = stripe.parse(body, {}, signed_at=int(self.now))
            arrivals.append(Arrival(incoming, self.now))
        record_many(self.engine, arrivals, now=self.now, max_attempts=MAX_ATTEMPTS)
        self.delivered.update(event.event_id for event in provider_events)

    def _claim(self) -> Job | None:
        claimed = self._claim_many(limit=1)
        return claimed[0] if claimed else None

    def _claim_many(self, limit: int) -> list[Job]:
        self.claims += 1  # each claim is another worker: a crashed one never comes back
        return claim(
            self.engine, worker_id=f"w{self.claims}", now=self.now, lease_seconds=LEASE, limit=limit
        )

    def _run(self, job: Job, *, may_have_lost_it: bool = False) -> None:
        try:
            self.processor(self.engine, job)
        except Exception as exc:  # e.g. a refund whose invoice is not known yet: retry later
            state = fail(
                self.engine,
                job,
                exc,
                now=self.now,
                policy=RETRY,
                rng=self.rng,
                dead_hooks=DEAD_HOOKS,
            )
            assert state is not None or may_have_lost_it, f"lost job {job.id} within one step"
            return
        done = complete(self.engine, job, now=self.now)
        assert done or may_have_lost_it, f"lost job {job.id} within one step"

    def _dispatcher(self, mailer: Any = None) -> EffectDispatcher:
        return EffectDispatcher(
            self.engine,
            self.settings,
            clock=lambda: self.now,
            lease_seconds=LEASE,
            mailer=mailer if mailer is not None else MaildirMailer(self.maildir),
            rng=self.rng,
        )


def _identity(kind: str, invoice_id: str | None, payload: str) -> tuple[str, str, str]:
    """Which effect a row is, read from what it is about, not from its key."""
    data = orjson.loads(payload)
    ref = data.get("refund_id") or data.get("attempt") or ""
    return (kind, str(invoice_id), str(ref))


def _maildir_emails(path: Path) -> list[ObservedEmail]:
    if not path.exists():
        return []
    found = []
    for message in mailbox.Maildir(path, create=False):
        headers = {name: str(value) for name, value in message.items()}
        subject = str(message.get("Subject", ""))
        effect = classify_email(headers, subject)
        found.append(
            ObservedEmail(
                message_id=message.get("Message-ID"),
                kind=effect.kind if effect else None,
                invoice_id=effect.invoice_id if effect else None,
                ref=effect.ref if effect else "",
                subject=subject,
            )
        )
    return found


def _run(machine: type[PipelineMachine], examples: int) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples * (10 if LONG else 1),
            stateful_step_count=30 if not LONG else 60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_pipeline_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    template = Path(sqlite_url.split("///", 1)[1])

    def fresh(workdir: Path) -> str:
        copy = workdir / "billhook.db"
        shutil.copyfile(template, copy)  # migrated once; a fresh file per example
        return f"sqlite:///{copy}"

    machine = type(
        "SqlitePipeline",
        (PipelineMachine,),
        {"fresh_database": staticmethod(fresh), "root": tmp_path},
    )
    _run(machine, examples=30)


@pytest.mark.postgres
def test_pipeline_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)

    def fresh(_workdir: Path) -> str:
        engine = create_engine(postgres_url, poolclass=sa.NullPool)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        finally:
            engine.dispose()
        return postgres_url

    machine = type(
        "PostgresPipeline",
        (PipelineMachine,),
        {"fresh_database": staticmethod(fresh), "root": tmp_path},
    )
    _run(machine, examples=10)
