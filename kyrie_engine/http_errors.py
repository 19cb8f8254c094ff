"""Every HTTP error, rendered one way: JSON `{"message": ..., "request_id": ...}`.

The Next.js app shows `message` in a toast, so it is written for a person and
never carries anything internal (no exception text, no SQL, no trace).  Routes
raise `ApiError`; Starlette's own 404/405 arrive as `HTTPException`; a database
that cannot be reached arrives as one of asyncpg's or the socket's exceptions
and becomes 503; anything else is a bug and becomes 500 in the request
middleware (kyrie_engine.api), which logs its type and place.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from kyrie_engine.logs import request_id


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra = extra
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers


# The database is down, restarting, refusing connections or out of them: the
# caller may retry later, so 503 rather than 500.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,  # pool acquire or connect timed out (asyncio.TimeoutError is the same class)
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)

_STATUS_MESSAGES = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
    500: "internal error",
    503: "database unavailable, try again shortly",
}


def error_response(
    status: int,
    message: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "request_id": request_id.get() or ""}
    if errors is not None:
        body["errors"] = errors
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, errors=exc.errors, headers=exc.headers, extra=exc.extra)


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's routing errors (404 unknown path, 405 with its Allow header)."""
    assert isinstance(exc, HTTPException)
    message = _STATUS_MESSAGES.get(exc.status_code, "request failed")
    if exc.status_code == 405:
        message = f"method {request.method} not allowed here"
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


async def on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, _STATUS_MESSAGES[503], headers={"Retry-After": "2"})


def internal_error() -> JSONResponse:
    return error_response(500, _STATUS_MESSAGES[500])


def exception_handlers() -> dict[Any, Any]:
    handlers: dict[Any, Any] = {ApiError: on_api_error, HTTPException: on_http_exception}
    for cls in DATABASE_UNAVAILABLE:
        handlers[cls] = on_database_unavailable
    return handlers
