"""`GET /healthz` (the process answers), `GET /readyz` (the database is reachable and migrated)."""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billhook.store.migrate import current_revision, head_revision


async def healthz(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    problem = await run_in_threadpool(_database_problem, request.app.state.engine)
    if problem:
        return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
    return JSONResponse({"status": "ready"})


def _database_problem(engine: sa.Engine) -> str | None:
    try:
        current = current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
        first = reason[0] if reason else type(exc).__name__
        return f"database unreachable ({first}): check BILLHOOK_DATABASE_URL and that it is up"
    head = _head()
    if current != head:
        return f"database schema at {current or 'nothing'}, needs {head}: run `billhook migrate`"
    return None


@cache
def _head() -> str | None:
    return head_revision()


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
