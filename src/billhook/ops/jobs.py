"""List queue jobs for operators, by state; one job with its attempts is `ops.dlq.show_job`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import InvalidRequest
from billhook.ops.pages import DEFAULT_LIMIT, Page, check_limit, decode_cursor, encode_cursor
from billhook.queue.jobs import Job
from billhook.queue.states import JobState
from billhook.store.schema import events, jobs


def list_jobs(
    engine: Engine,
    *,
    state: str | None = None,
    ordering_key: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page[Job]:
    """Jobs matching every filter given, newest first."""
    check_limit(limit)
    query = sa.select(jobs).order_by(jobs.c.id.desc())
    if state is not None:
        known = [s.value for s in JobState]
        if state not in known:
            raise InvalidRequest(f"state must be one of {', '.join(known)}, got {state!r}")
        query = query.where(jobs.c.state == state)
    if ordering_key is not None:
        query = query.where(
            jobs.c.ordering_key == ordering_key, jobs.c.id.in_(_of_key(ordering_key))
        )
    if cursor is not None:
        (after_id,) = decode_cursor(cursor, (int,))
        query = query.where(jobs.c.id < after_id)
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit + 1)).mappings().all()
    items = [Job.from_row(row) for row in rows[:limit]]
    next_cursor = encode_cursor([items[-1].id]) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


def _of_key(ordering_key: str) -> sa.CompoundSelect[tuple[int]]:
    """The ids of a key's jobs, each half answered by an index (jobs have no plain index on
    `ordering_key`, see the schema): through the key's events, and among jobs with no event."""
    through_events = (
        sa.select(jobs.c.id)
        .join(events, events.c.id == jobs.c.event_pk)
        .where(events.c.ordering_key == ordering_key)
    )
    eventless = sa.select(jobs.c.id).where(
        jobs.c.event_pk.is_(None), jobs.c.ordering_key == ordering_key
    )
    return sa.union_all(through_events, eventless)
