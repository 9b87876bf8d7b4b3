"""The admin API, `/api/v1`: a FastAPI app mounted beside the webhook routes.

Auth is `Authorization: Bearer <token>` only (never a webhook signature). Two dependencies carry
it: `viewer` (any valid token) for reads, and `operator`, which checks the role and hands back an
`OperatorAction` — the only way a route can act, and its `perform` writes the audit row. A new
operator route (replay, resend) is one function:

    @router.post("/replay")
    def replay(body: ReplayRequest, act: OperatorAction = Depends(operator)) -> ReplayResult:
        return act.perform("replay", body.model_dump(), lambda: ops.replay.run(act.engine, ...))

Every route is a plain `def`: the store is synchronous SQLAlchemy, so FastAPI runs them in its
thread pool and the event loop never blocks on the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from starlette.responses import Response

import billhook
from billhook.api.admin_models import (
    AuditPage,
    AuditRecord,
    DeadEffectPage,
    DeadLetterPage,
    ErrorBody,
    Event,
    EventPage,
    EventWithBody,
    Invoice,
    InvoicePage,
    JobPage,
    Redriven,
)
from billhook.api.errors import error_response
from billhook.api.replay_models import ReplayBody, ReplayOutcome
from billhook.config import Settings
from billhook.effects.deadletter import DeadEffect, list_dead_effects, redrive_effect
from billhook.errors import BillhookError, Forbidden, InvalidRequest, Unauthorized
from billhook.observability import get_logger
from billhook.ops import audit as audit_ops
from billhook.ops import dlq
from billhook.ops import events as event_ops
from billhook.ops import invoices as invoice_ops
from billhook.ops import jobs as job_ops
from billhook.ops.dlq import JobDetail
from billhook.ops.pages import DEFAULT_LIMIT, MAX_ID, MAX_LIMIT
from billhook.ops.pause import PauseState, set_paused
from billhook.ops.replay import replay as run_replay
from billhook.ops.status import Status, read_status
from billhook.ops.tokens import Principal, authenticate
from billhook.queue.states import JobState

T = TypeVar("T")

# Closed sets as Literals, so the schema lists them and FastAPI refuses others with a 422.
# tests/test_admin_schema.py checks they match the store's and the use cases' own lists.
InvoiceStatus = Literal[
    "draft", "open", "paid", "partially_refunded", "refunded", "void", "uncollectible"
]
EventOutcome = Literal["pending", "processed", "ignored", "failed"]
Source = Literal["stripe", "standard"]

PREFIX = "/api/v1"

_log = get_logger("billhook.admin")
_bearer = HTTPBearer(
    auto_error=False,
    description="An admin token from `billhook token create --role viewer|operator`.",
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "A filter or parameter is invalid."),
        (401, "No token, an unknown token or a revoked one."),
        (403, "The token's role may not do this."),
        (404, "No such thing."),
        (503, "The database cannot answer right now; retry."),
    )
}


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def viewer(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """Any valid, unrevoked token: viewers and operators may read."""
    return authenticate(engine_of(request), credentials.credentials if credentials else None)


@dataclass(frozen=True)
class OperatorAction:
    """Proof that the caller is an operator; the one way an admin route changes anything."""

    engine: Engine
    principal: Principal

    def perform(self, action: str, params: Mapping[str, Any], operation: Callable[[], T]) -> T:
        return audit_ops.perform(
            self.engine,
            actor=self.principal.name,
            action=action,
            params=params,
            operation=operation,
        )


def operator(request: Request, principal: Principal = Depends(viewer)) -> OperatorAction:
    principal.require("operator")
    return OperatorAction(engine=engine_of(request), principal=principal)


router = APIRouter(responses=_ERRORS)

_Since = Query(None, ge=0, allow_inf_nan=False, description="Epoch seconds, inclusive.")
_Until = Query(None, ge=0, allow_inf_nan=False, description="Epoch seconds, exclusive.")
_Limit = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
# PostgreSQL text cannot hold NUL, so no stored value has one: the schema refuses it up front.
_NO_NUL = r"^[^\x00]*$"
_Cursor = Query(None, pattern=_NO_NUL, description="`next_cursor` of the previous page.")
_JobId = Path(ge=1, le=MAX_ID)
_EffectId = Path(ge=1, le=MAX_ID)


@router.get("/status", tags=["operations"])
def get_status(request: Request, _: Principal = Depends(viewer)) -> Status:
    return read_status(engine_of(request), now=time.time())


@router.get("/invoices/{invoice_id}", tags=["invoices"])
def get_invoice(invoice_id: str, request: Request, _: Principal = Depends(viewer)) -> Invoice:
    return Invoice.from_value(invoice_ops.get_invoice(engine_of(request), _text(invoice_id)))


@router.get("/invoices", tags=["invoices"])
def list_invoices(
    request: Request,
    status: InvoiceStatus | None = Query(None, description="One invoice status."),
    email: str | None = Query(
        None, pattern=_NO_NUL, description="Customer email, case-insensitive."
    ),
    updated_since: float | None = _Since,
    updated_until: float | None = _Until,
    attention: bool | None = Query(None, description="Only invoices that need a look (true)."),
    limit: int = _Limit,
    cursor: str | None = _Cursor,
    _: Principal = Depends(viewer),
) -> InvoicePage:
    page = invoice_ops.list_invoices(
        engine_of(request),
        status=_text(status),
        email=_text(email),
        updated_since=updated_since,
        updated_until=updated_until,
        attention=attention,
        limit=limit,
        cursor=_text(cursor),
    )
    return InvoicePage(
        items=[Invoice.from_value(i) for i in page.items], next_cursor=page.next_cursor
    )


@router.get("/events", tags=["events"])
def list_events(
    request: Request,
    source: Source | None = None,
    type: str | None = Query(None, pattern=_NO_NUL, description="Event type, e.g. invoice.paid."),
    ordering_key: str | None = Query(None, pattern=_NO_NUL, description="Usually the invoice id."),
    outcome: EventOutcome | None = None,
    received_since: float | None = _Since,
    received_until: float | None = _Until,
    limit: int = _Limit,
    cursor: str | None = _Cursor,
    _: Principal = Depends(viewer),
) -> EventPage:
    page = event_ops.list_events(
        engine_of(request),
        source=_text(source),
        type=_text(type),
        ordering_key=_text(ordering_key),
        outcome=_text(outcome),
        received_since=received_since,
        received_until=received_until,
        limit=limit,
        cursor=_text(cursor),
    )
    return EventPage(items=[Event.from_value(e) for e in page.items], next_cursor=page.next_cursor)


@router.get("/events/{event_id}", tags=["events"])
def get_event(
    event_id: str,
    request: Request,
    source: Source | None = Query(None, description="Needed only if two sources share the id."),
    _: Principal = Depends(viewer),
) -> EventWithBody:
    detail = event_ops.get_event(engine_of(request), _text(event_id), source=_text(source))
    return EventWithBody.from_detail(detail)


@router.get("/jobs", tags=["queue"])
def list_jobs(
    request: Request,
    state: JobState | None = None,
    ordering_key: str | None = Query(None, pattern=_NO_NUL, description="Usually the invoice id."),
    limit: int = _Limit,
    cursor: str | None = _Cursor,
    _: Principal = Depends(viewer),
) -> JobPage:
    page = job_ops.list_jobs(
        engine_of(request),
        state=state.value if state is not None else None,
        ordering_key=_text(ordering_key),
        limit=limit,
        cursor=_text(cursor),
    )
    return JobPage(items=page.items, next_cursor=page.next_cursor)


@router.get("/jobs/{job_id}", tags=["queue"])
def get_job(job_id: int = _JobId, *, request: Request, _: Principal = Depends(viewer)) -> JobDetail:
    return dlq.show_job(engine_of(request), job_id)


@router.get("/dead-letters", tags=["queue"])
def list_dead_letters(
    request: Request,
    type: str | None = Query(
        None, pattern=_NO_NUL, description="Only jobs whose event has this type."
    ),
    limit: int = Query(100, ge=1, le=dlq.MAX_LIMIT),
    after_id: int | None = Query(None, ge=0, le=MAX_ID, description="Last job_id seen."),
    _: Principal = Depends(viewer),
) -> DeadLetterPage:
    items = dlq.list_dead(
        engine_of(request), event_type=_text(type), limit=limit, after_id=after_id
    )
    return DeadLetterPage(
        items=items, next_after_id=items[-1].job_id if len(items) == limit else None
    )


@router.post("/dead-letters/{job_id}/redrive", tags=["queue"])
def redrive_dead_letter(
    job_id: int = _JobId, *, request: Request, act: OperatorAction = Depends(operator)
) -> Redriven:
    settings: Settings = request.app.state.settings
    result = act.perform(
        "redrive",
        {"job_ids": [job_id]},
        lambda: dlq.redrive(
            act.engine, now=time.time(), max_attempts=settings.max_attempts, job_ids=[job_id]
        ),
    )
    return Redriven(redriven=result.count, job_ids=result.job_ids)


@router.get("/dead-effects", tags=["queue"])
def list_dead_effect_letters(
    request: Request,
    limit: int = Query(100, ge=1, le=dlq.MAX_LIMIT),
    _: Principal = Depends(viewer),
) -> DeadEffectPage:
    """Emails and HTTP effects that could not be delivered, oldest first, with their last error."""
    return DeadEffectPage(items=list_dead_effects(engine_of(request), limit=limit))


@router.post("/dead-effects/{effect_id}/redrive", tags=["queue"])
def redrive_dead_effect(
    effect_id: int = _EffectId,
    *,
    act: OperatorAction = Depends(operator),
) -> DeadEffect:
    """Send a dead effect again under the same idempotency key, with a fresh attempt budget."""
    return act.perform(
        "redrive_effect",
        {"effect_id": effect_id},
        lambda: redrive_effect(act.engine, effect_id, time.time()),
    )


@router.post("/pause", tags=["operations"])
def pause(act: OperatorAction = Depends(operator)) -> PauseState:
    """Stop processing; ingest keeps accepting and storing events."""
    return act.perform("pause", {}, lambda: set_paused(act.engine, True, now=time.time()))


@router.post("/resume", tags=["operations"])
def resume(act: OperatorAction = Depends(operator)) -> PauseState:
    return act.perform("resume", {}, lambda: set_paused(act.engine, False, now=time.time()))


@router.post("/replay", tags=["operations"])
def replay(
    request: Request, body: ReplayBody = Body(), act: OperatorAction = Depends(operator)
) -> ReplayOutcome:
    """Re-run stored events through the normal pipeline. A dry run (the default) writes
    nothing and is not audited; a real replay is audited and never re-sends a sent effect unless
    `resend_effects` names its kind."""
    settings: Settings = request.app.state.settings
    result = run_replay(act.engine, body.to_request(), settings=settings, perform=act.perform)
    return ReplayOutcome.from_value(result)


@router.get("/audit", tags=["audit"])
def list_audit(
    request: Request,
    actor: str | None = Query(None, pattern=_NO_NUL),
    action: str | None = Query(None, pattern=_NO_NUL),
    limit: int = Query(100, ge=1, le=audit_ops.MAX_LIMIT),
    before_id: int | None = Query(None, ge=1, le=2**62, description="Entries older than this."),
    _: Principal = Depends(viewer),
) -> AuditPage:
    entries = audit_ops.list_audit(
        engine_of(request),
        limit=limit,
        before_id=before_id,
        actor=_text(actor),
        action=_text(action),
    )
    return AuditPage(
        items=[AuditRecord.from_value(e) for e in entries],
        next_before_id=entries[-1].id if len(entries) == limit else None,
    )


def create_admin_app(settings: Settings, engine: Engine) -> FastAPI:
    """The admin API, to be mounted at `/api/v1` (its OpenAPI and docs live under it)."""
    app = FastAPI(
        title="billhook admin API",
        version=billhook.__version__,
        description="Read billing state; operators also act. Every action is audited.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.include_router(router)
    app.add_exception_handler(BillhookError, _billhook_error)
    return app


def _text(value: T) -> T:
    # PostgreSQL text cannot hold NUL; a NUL in a filter is a bad request, not a driver error.
    if isinstance(value, str) and "\x00" in value:
        raise InvalidRequest("parameters must not contain NUL characters")
    return value


async def _billhook_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BillhookError)
    response: JSONResponse = error_response(exc)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="billhook"'
    if isinstance(exc, Unauthorized | Forbidden):
        # Refused before any use case ran: nothing changed, so this goes to the log, not the audit.
        _log.info(
            "admin_refused",
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            reason=str(exc),
        )
    return response
