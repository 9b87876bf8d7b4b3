"""The audit trail: who did which operator action, with what parameters, when, and how it ended.

`perform` is the one door every operator action (pause, resume, redrive, replay, resend, token
create and revoke) goes through, from the CLI and the admin API alike. It writes the attempt
*before* running the action and its outcome after, so an action whose process dies midway still
leaves a row (outcome `started`) instead of vanishing from the trail. If the audit row cannot be
written, the action does not run: no action without a trace.

Refusals before the use case (no token, wrong role) change nothing and are only logged; attempts
that reach the use case are recorded, including the ones it refuses (outcome `refused: ...`).
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import BillhookError, InvalidRequest, StoreUnavailable
from billhook.observability import get_logger
from billhook.store.engine import transaction
from billhook.store.schema import audit_log

T = TypeVar("T")

CLI_ACTOR_PREFIX = "cli:"
OUTCOME_STARTED = "started"
OUTCOME_OK = "ok"
MAX_LIMIT = 1000

_log = get_logger(__name__)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    params: dict[str, Any]
    outcome: str


def cli_actor() -> str:
    """The actor name of a command run from a shell: the operating-system user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return f"{CLI_ACTOR_PREFIX}{user}"


def perform(
    engine: Engine,
    *,
    actor: str,
    action: str,
    params: Mapping[str, Any],
    operation: Callable[[], T],
    now: Callable[[], float] = time.time,
) -> T:
    """Record the attempt, run `operation`, record its outcome; return its result or re-raise."""
    entry_id = _record_start(engine, actor=actor, action=action, params=params, at=now())
    try:
        result = operation()
    except BillhookError as exc:
        _finish(engine, entry_id, f"refused: {type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        _finish(engine, entry_id, f"failed: {type(exc).__name__}: {exc}")
        raise
    # A result that can summarize itself (replay's counts) is recorded with its summary.
    summary = getattr(result, "audit_outcome", None)
    _finish(
        engine, entry_id, f"{OUTCOME_OK}: {summary}" if isinstance(summary, str) else OUTCOME_OK
    )
    _log.info("operator_action", actor=actor, action=action, params=dict(params))
    return result


def list_audit(
    engine: Engine,
    *,
    limit: int = 100,
    before_id: int | None = None,
    actor: str | None = None,
    action: str | None = None,
) -> list[AuditEntry]:
    """Newest first; `before_id` continues a previous page (pass the last id you saw)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(audit_log.c.id < before_id)
    if actor is not None:
        query = query.where(audit_log.c.actor == actor)
    if action is not None:
        query = query.where(audit_log.c.action == action)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [
        AuditEntry(
            id=int(row["id"]),
            at=float(row["at"]),
            actor=row["actor"],
            action=row["action"],
            params=orjson.loads(row["params"]),
            outcome=row["outcome"],
        )
        for row in rows
    ]


def _record_start(
    engine: Engine, *, actor: str, action: str, params: Mapping[str, Any], at: float
) -> int:
    encoded = orjson.dumps(dict(params), default=str, option=orjson.OPT_SORT_KEYS).decode()
    with transaction(engine) as connection:
        entry_id = connection.execute(
            audit_log.insert()
            .values(at=at, actor=actor, action=action, params=encoded, outcome=OUTCOME_STARTED)
            .returning(audit_log.c.id)
        ).scalar_one()
    return int(entry_id)


def _finish(engine: Engine, entry_id: int, outcome: str) -> None:
    # The action has already happened (or failed): losing its outcome must not turn a done
    # action into a reported error, nor hide the action's own error. The row stays `started`.
    try:
        with transaction(engine) as connection:
            connection.execute(
                audit_log.update().where(audit_log.c.id == entry_id).values(outcome=outcome)
            )
    except StoreUnavailable as exc:
        _log.warning("audit_outcome_lost", entry_id=entry_id, outcome=outcome, error=str(exc))
