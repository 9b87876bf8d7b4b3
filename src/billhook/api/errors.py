"""The one place where billhook's errors become HTTP answers: JSON `{"detail": ...}`."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billhook.errors import (
    BillhookError,
    Forbidden,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    Unauthorized,
    WebhookRejected,
)


def status_code_for(exc: BillhookError) -> int:
    if isinstance(exc, WebhookRejected):
        return exc.status_code
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, InvalidRequest):
        return 400
    return 500


def error_response(exc: BillhookError) -> JSONResponse:
    status = status_code_for(exc)
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


async def _billhook_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BillhookError)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


EXCEPTION_HANDLERS = {BillhookError: _billhook_error, HTTPException: _http_error}
