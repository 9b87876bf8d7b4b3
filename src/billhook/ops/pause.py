"""Pause and resume processing: a stored switch (`settings.paused`), so it survives restarts.

Workers check it inside the claim query itself, so a pause takes effect on the very next claim
of every worker; running jobs finish. Ingest ignores it and keeps storing events and jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from billhook.queue.claims import PAUSED_KEY
from billhook.queue.jobs import notify_enqueued, wake_local_workers
from billhook.store.engine import transaction
from billhook.store.schema import settings


@dataclass(frozen=True)
class PauseState:
    paused: bool
    changed_at: float | None

    def to_dict(self) -> dict[str, object]:
        return {"paused": self.paused, "changed_at": self.changed_at}


def set_paused(engine: Engine, paused: bool, *, now: float) -> PauseState:
    """Pause (True) or resume (False); idempotent. Resuming wakes waiting workers."""
    values = {"key": PAUSED_KEY, "value": "true" if paused else "false", "updated_at": now}
    insert = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(
        settings
    )
    statement = insert.values(**values).on_conflict_do_update(
        index_elements=[settings.c.key],
        set_={"value": values["value"], "updated_at": now},
    )
    with transaction(engine) as connection:
        connection.execute(statement)
        if not paused:
            notify_enqueued(connection)
    if not paused:
        wake_local_workers()
    return PauseState(paused=paused, changed_at=now)


def pause_state(engine: Engine) -> PauseState:
    with engine.connect() as connection:
        return read_pause_state(connection)


def read_pause_state(connection: Connection) -> PauseState:
    row = connection.execute(
        sa.select(settings.c.value, settings.c.updated_at).where(settings.c.key == PAUSED_KEY)
    ).first()
    if row is None:
        return PauseState(paused=False, changed_at=None)
    return PauseState(paused=row[0] == "true", changed_at=float(row[1]))
