"""The database schema, as SQLAlchemy Core tables. Migrations in `migrations/` build exactly this.

Times are epoch seconds (double precision) everywhere: one representation on both databases,
comparable in SQL without time-zone surprises. States are enforced here with CHECK constraints
as well as in code.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

JOB_STATES = ("available", "running", "retryable", "completed", "dead")
EFFECT_STATES = ("pending", "sending", "sent", "retryable", "dead")
INVOICE_STATUSES = (
    "draft",
    "open",
    "paid",
    "partially_refunded",
    "refunded",
    "void",
    "uncollectible",
)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# One row per distinct provider event, written once: the raw body is the source of truth for
# replay. How many times it was delivered, and when last, is read from `deliveries`; what
# processing made of it, from `event_outcomes`.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("event_id", sa.String(255), nullable=False),
    sa.Column("type", sa.String(255), nullable=False),
    sa.Column("ordering_key", sa.String(255), nullable=False),
    sa.Column("occurred_at", sa.Double(), nullable=True),
    sa.Column("received_at", sa.Double(), nullable=False),
    sa.Column("headers", sa.Text(), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.UniqueConstraint("source", "event_id"),
    sa.Index(None, "ordering_key"),
    sa.Index(None, "received_at"),
)

# What processing made of an event: processed | ignored | failed; no row while it waits. Its own
# table so that the event row, with its ~4 KB body, is written once and never rewritten (marking
# it in place rewrote the whole row: ~4 KB of WAL per event on SQLite, a new row version and an
# entry in every index on PostgreSQL).
event_outcomes = sa.Table(
    "event_outcomes",
    metadata,
    sa.Column(
        "event_pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.ForeignKey("events.id"),
        primary_key=True,
    ),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("processed_at", sa.Double(), nullable=False),
)

# Every event with its outcome (NULL while it waits): select from this to read both.
events_with_outcomes = events.outerjoin(
    event_outcomes, event_outcomes.c.event_pk == events.c.id
)

# One row per accepted HTTP delivery, duplicates included: explain shows every one.
# `event_pk` is the events row the same transaction inserted or found, and events are never
# deleted; it has no foreign key because on PostgreSQL the check locks that events row (FOR KEY
# SHARE) for every delivery: a provider's retries of one event arriving at several server
# processes at once contended for it (multixacts), and duplicates cost more than new events.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("event_pk", sa.BigInteger(), nullable=False),
    sa.Column("received_at", sa.Double(), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.CheckConstraint(_in("outcome", ("accepted", "duplicate")), name="outcome"),
    sa.Index(None, "event_pk"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False, server_default="process_event"),
    sa.Column("event_pk", sa.BigInteger(), sa.ForeignKey("events.id"), nullable=True),
    sa.Column("ordering_key", sa.String(255), nullable=False),
    # Provider time, then arrival (id): the order jobs of one key run in.
    sa.Column("order_ts", sa.Double(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, server_default="available"),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("run_at", sa.Double(), nullable=False),
    sa.Column("lease_expires_at", sa.Double(), nullable=True),
    sa.Column("worker_id", sa.String(128), nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("started_at", sa.Double(), nullable=True),
    sa.Column("finished_at", sa.Double(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.CheckConstraint(_in("state", JOB_STATES), name="state"),
    sa.CheckConstraint(
        "(state IN ('completed', 'dead')) = (finished_at IS NOT NULL)", name="finished"
    ),
    # A state change rewrites the row out of place (an indexed column changed): every index
    # without a predicate gets an entry per change, so indexes on `state` are partial and cover
    # only the jobs that query needs (waiting, running, dead), not the completed bulk.
    # No plain index on `ordering_key`: its random keys cost a page write per new job (a fifth
    # of ingest's WAL). The claim's tests use the partial indexes below; listing the jobs of a
    # key goes through `events.ordering_key` and `event_pk` (`ops.jobs`), or, for the jobs with
    # no event, through `ix_jobs_eventless_key`.
    sa.Index(None, "event_pk"),
    sa.Index(
        "ix_jobs_eventless_key",
        "ordering_key",
        sqlite_where=sa.text("event_pk IS NULL"),
        postgresql_where=sa.text("event_pk IS NULL"),
    ),
    # The claim's test "does an earlier job of this key still wait?".
    sa.Index(
        "ix_jobs_waiting_key",
        "ordering_key",
        "order_ts",
        "id",
        sqlite_where=sa.text("state IN ('available', 'retryable')"),
        postgresql_where=sa.text("state IN ('available', 'retryable')"),
    ),
    # The dead-letter list and redrive.
    sa.Index(
        "ix_jobs_dead",
        "id",
        sqlite_where=sa.text("state = 'dead'"),
        postgresql_where=sa.text("state = 'dead'"),
    ),
    # The claim walks waiting jobs in provider order (order_ts, id), where the first waiting job
    # of each key is its head, and stops at the first claimable ones.
    sa.Index(
        "ix_jobs_claimable",
        "order_ts",
        "id",
        sqlite_where=sa.text("state IN ('available', 'retryable')"),
        postgresql_where=sa.text("state IN ('available', 'retryable')"),
    ),
    # A key runs one job at a time, enforced by the database as well as by the claim query.
    sa.Index(
        "uq_jobs_running_key",
        "ordering_key",
        unique=True,
        sqlite_where=sa.text("state = 'running'"),
        postgresql_where=sa.text("state = 'running'"),
    ),
)

job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("job_id", sa.BigInteger(), sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("worker_id", sa.String(128), nullable=True),
    sa.Column("started_at", sa.Double(), nullable=False),
    sa.Column("finished_at", sa.Double(), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error_type", sa.String(255), nullable=True),
    sa.Column("error_message", sa.Text(), nullable=True),
    sa.Column("traceback", sa.Text(), nullable=True),
    sa.CheckConstraint(
        _in("outcome", ("completed", "failed", "rescued", "released")), name="outcome"
    ),
    sa.Index(None, "job_id"),
)

invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("number", sa.String(255), nullable=True),
    sa.Column("status", sa.String(32), nullable=True),
    sa.Column("disputed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("currency", sa.String(16), nullable=True),
    sa.Column("amount_due", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("amount_paid", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("amount_refunded", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("customer_email", sa.String(320), nullable=True),
    # The pure model's whole state (refunds, held refunds, attempts...), JSON.
    sa.Column("state", sa.Text(), nullable=False),
    # Optimistic concurrency: every write is `UPDATE ... WHERE version = :seen`.
    sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
    # Why an operator should look (a dead job, a refund held too long); NULL when fine.
    sa.Column("attention", sa.Text(), nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
    sa.CheckConstraint(
        "status IS NULL OR " + _in("status", INVOICE_STATUSES), name="status"
    ),
    sa.Index(None, "status"),
    sa.Index(None, "customer_email"),
    sa.Index(None, "updated_at"),
)

invoice_transitions = sa.Table(
    "invoice_transitions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("invoice_id", sa.String(255), nullable=False),
    sa.Column("event_pk", sa.BigInteger(), sa.ForeignKey("events.id"), nullable=True),
    sa.Column("from_status", sa.String(32), nullable=True),
    sa.Column("to_status", sa.String(32), nullable=True),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("at", sa.Double(), nullable=False),
    sa.Index(None, "invoice_id"),
)

# Which invoice a charge paid: disputes and refunds name the charge, not the invoice.
charge_links = sa.Table(
    "charge_links",
    metadata,
    sa.Column("charge_id", sa.String(255), primary_key=True),
    sa.Column("invoice_id", sa.String(255), nullable=False),
    sa.Column("created_at", sa.Double(), nullable=False),
)

# The transactional outbox: effect intents written with the state change that caused them.
effects = sa.Table(
    "effects",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("invoice_id", sa.String(255), nullable=True),
    sa.Column("event_pk", sa.BigInteger(), sa.ForeignKey("events.id"), nullable=True),
    sa.Column("payload", sa.Text(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    # Deliveries handed over more than once under the same key (crash between send and record).
    sa.Column("resends", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("run_at", sa.Double(), nullable=False),
    sa.Column("lease_expires_at", sa.Double(), nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("sent_at", sa.Double(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.CheckConstraint(_in("state", EFFECT_STATES), name="state"),
    sa.CheckConstraint(_in("channel", ("email", "webhook")), name="channel"),
    sa.Index(None, "state", "run_at"),
    sa.Index(None, "invoice_id"),
)

effect_attempts = sa.Table(
    "effect_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("effect_id", sa.BigInteger(), sa.ForeignKey("effects.id"), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("started_at", sa.Double(), nullable=False),
    sa.Column("finished_at", sa.Double(), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.CheckConstraint(
        _in("outcome", ("sending", "sent", "failed", "resent")), name="outcome"
    ),
    sa.Index(None, "effect_id"),
)

# Small key/value switches that must survive restarts (e.g. `paused`).
settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("revoked_at", sa.Double(), nullable=True),
    sa.CheckConstraint(_in("role", ("viewer", "operator")), name="role"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("at", sa.Double(), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("params", sa.Text(), nullable=False),
    sa.Column("outcome", sa.Text(), nullable=False),
    sa.Index(None, "at"),
)
