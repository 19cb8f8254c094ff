"""The HTTP API the Next.js app calls: built by `build_app`, read top to bottom.

Callers are route handlers of the Next.js app that have already checked the
user's session; they prove who they are with the shared `X-Internal-Secret`
(compared in constant time, by length too: both sides are hashed first) and
tell us which user they act for (`X-Kyrie-User-Id` on job routes, `user_id` in
the body of an analysis).  Whether that user may touch a workspace is not
decided here: the API asks the database's own membership rule
(`kyrie.is_member_of`, through which `kyrie.is_workspace_member` and so every
policy is defined), in the same statement that enqueues for an analysis.

Request handling, outermost first: `RequestContext` gives each request an id
(logged on every line, returned in `X-Request-Id`), times it for the metrics,
writes one access line, and turns an unexpected exception into a bare 500;
Starlette's exception middleware renders everything expected through
kyrie_engine.http_errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kyrie_engine import console, queue
from kyrie_engine.db import create_pool, session_unchanged
from kyrie_engine.events import Follower, JobEvents
from kyrie_engine.http_errors import DATABASE_UNAVAILABLE, ApiError, exception_handlers, internal_error
from kyrie_engine.logs import describe_exception, request_id
from kyrie_engine.metrics import CONTENT_TYPE, Metrics
from kyrie_engine.openapi import SECRET_HEADER, USER_HEADER, document
from kyrie_engine.schemas import AnalyzeRequest, JobView
from kyrie_engine.settings import Settings

log = logging.getLogger("kyrie_engine.api")

ANALYZE_KIND = "cfo.analyze"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")

_UUID_TEXT_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# The rule of every policy (kyrie.is_workspace_member is defined through it),
# asked for a named user in one statement (kyrie_engine/sql/20261201000101_*).
IS_MEMBER_SQL = "select kyrie.is_member_of($1, $2)"
# Workspace exists, user is a member, enqueue: one statement, refusals as values.
ACCEPT_SQL = "select outcome, job_id, created from kyrie.accept_job($1, $2::text::jsonb, $3, $4, $5)"


@dataclass
class Runtime:
    """What the routes share, set up by the app's lifespan."""

    settings: Settings
    secret_digest: bytes
    metrics: Metrics
    events: JobEvents
    pool: asyncpg.Pool | None = None
    worker: Any = None


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _pool(request: Request) -> asyncpg.Pool:
    pool = _runtime(request).pool
    if pool is None:
        raise ApiError(503, "database unavailable, try again shortly")
    return pool


# ---------------------------------------------------------------------------
# checks shared by the routes


def require_secret(request: Request) -> None:
    given = request.headers.get(SECRET_HEADER)
    if given is None:
        raise ApiError(401, f"missing {SECRET_HEADER} header")
    # Headers arrive decoded as latin-1; hashing both sides makes the comparison
    # constant-time whatever the given value's length.
    digest = hashlib.sha256(given.encode("latin-1")).digest()
    if not hmac.compare_digest(digest, _runtime(request).secret_digest):
        raise ApiError(401, f"wrong {SECRET_HEADER}")


async def read_json(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`, whatever Content-Length claimed."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body too large (limit {limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    # Never the offending input: only where and what.
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "body",
            "message": str(error["msg"]).removeprefix("Value error, "),
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]


def _repeated_keys(raw: bytes) -> list[str]:
    """Keys an object of the body names twice.  JSON parsers keep the last
    (`{"user_id": a, "user_id": b}` is for b), so a body whose parts disagree
    on whom it is for is refused, not quietly read one way."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):  # the common case, no key twice, costs one dict
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    repeated.append(key)
                seen.add(key)
        return obj

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except ValueError:
        return []
    return repeated


def parse_analyze(raw: bytes) -> AnalyzeRequest:
    try:
        request = AnalyzeRequest.model_validate_json(raw)
    except ValidationError as exc:
        malformed = [e for e in exc.errors() if e["type"] == "json_invalid"]
        if malformed:
            detail = str(malformed[0]["msg"]).removeprefix("Invalid JSON: ")
            raise ApiError(400, f"malformed JSON: {detail}") from None
        raise ApiError(422, "invalid request body", errors=_field_errors(exc)) from None
    repeated = _repeated_keys(raw)
    if repeated:
        # Only our own field names are echoed, never text the caller made up.
        known = [key for key in repeated if key in AnalyzeRequest.model_fields]
        named = f" ({', '.join(dict.fromkeys(known))})" if known else ""
        raise ApiError(400, f"the body names a field more than once{named}")
    return request


def _uuid_or_404(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ApiError(404, "job not found") from None


# ---------------------------------------------------------------------------
# the rules every /ai route follows, applied by the route factories below
#
# A route under /ai is built by `ai_route` (the secret) or `job_route` (the
# secret, then the user, then the job as that user may see it): a handler
# cannot forget a check it never performs.  tests/test_api_routes.py walks
# every route of the built app and proves each one refuses without them.
#
# The user arrives in one header, set by the Next.js route handler from the
# session it checked.  Not in the query: a job id spliced unencoded into a
# URL (`<job>?x=`, `<job>#`) rewrites or cuts the query the proxy appended,
# but it cannot reach a header.  So /ai routes take no query string at all,
# and the header must appear exactly once, as a uuid.


def _closed_query(request: Request) -> None:
    # The raw query string, as request.url.query would give it, without building the URL.
    if request.scope.get("query_string"):
        raise ApiError(
            400, f"this route takes no query parameters; the user goes in the {USER_HEADER} header"
        )


def header_user(request: Request) -> uuid.UUID | None:
    """The user in X-Kyrie-User-Id, None when absent; repeated or malformed is refused."""
    values = request.headers.getlist(USER_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{USER_HEADER} was given {len(values)} times; send it once")
    # The canonical spelling only: uuid.UUID also takes braces, a urn: prefix
    # or no hyphens, and one user should have one spelling on the wire.
    text = values[0].strip(" \t")  # optional whitespace around a value is HTTP's, not the value's
    if not _UUID_TEXT_RE.fullmatch(text):
        raise ApiError(
            422, "invalid header", errors=[{"field": f"header.{USER_HEADER}", "message": "must be a uuid"}]
        )
    return uuid.UUID(text)


def acting_user(request: Request) -> uuid.UUID:
    user = header_user(request)
    if user is None:
        raise ApiError(400, f"this route acts for a user: send the user's id in the {USER_HEADER} header")
    return user


Endpoint = Callable[[Request], Awaitable[Response]]
JobEndpoint = Callable[[Request, JobView], Awaitable[Response]]


def ai_route(path: str, endpoint: Endpoint, methods: list[str]) -> Route:
    """A route that answers only callers holding the internal secret, with no query string."""

    async def guarded(request: Request) -> Response:
        require_secret(request)
        _closed_query(request)
        return await endpoint(request)

    guarded.__name__ = guarded.__qualname__ = endpoint.__name__
    return Route(path, guarded, methods=methods, name=endpoint.__name__)


def job_route(path: str, endpoint: JobEndpoint, methods: list[str]) -> Route:
    """An `ai_route` for one job, on behalf of a user: the endpoint receives the job only
    when the user may see it (a member of its workspace; for a job without one, its user)."""

    async def for_member(request: Request) -> Response:
        user = acting_user(request)
        job = await _visible_job(request, _uuid_or_404(request.path_params["job_id"]), user)
        return await endpoint(request, job)

    for_member.__name__ = endpoint.__name__
    return ai_route(path, for_member, methods)


async def _visible_job(request: Request, job_id: uuid.UUID, user_id: uuid.UUID) -> JobView:
    """The job, or 404 when it does not exist or the user may not see it (the same answer,
    so a stranger learns nothing about other tenants' job ids)."""
    async with _pool(request).acquire() as conn:
        found = await queue.get_job(conn, job_id)
        if found is None:
            raise ApiError(404, "job not found")
        job = JobView.of(found)
        if job.workspace_id is not None:
            visible = bool(await conn.fetchval(IS_MEMBER_SQL, job.workspace_id, user_id))
        else:
            visible = job.user_id == user_id
    if not visible:
        raise ApiError(404, "job not found")
    return job


# ---------------------------------------------------------------------------
# routes

# kyrie.accept_job's refusals, as the API answers them.
_REFUSALS = {
    "workspace_not_found": (404, "workspace not found"),
    "not_a_member": (403, "this user is not a member of the workspace"),
}


async def analyze(request: Request) -> Response:
    """Accept one analysis: one statement checks the workspace and the membership and enqueues."""
    runtime = _runtime(request)
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY_RE.match(key):
        raise ApiError(
            422, "invalid Idempotency-Key",
            errors=[{"field": "header.Idempotency-Key", "message": "1 to 200 visible ASCII characters"}],
        )
    body = parse_analyze(await read_json(request, runtime.settings.max_body_bytes))
    # The contract puts the user in the body; a header, if the caller also sends
    # one, must name the same user, or two parts of the request disagree on whom
    # it is for.
    also = header_user(request)
    if also is not None and also != body.user_id:
        raise ApiError(400, f"{USER_HEADER} and the body's user_id name different users")

    pool = _pool(request)
    row = await pool.fetchrow(
        ACCEPT_SQL, ANALYZE_KIND, queue.to_json(body.payload()), body.workspace_id, body.user_id, key
    )
    assert row is not None
    if row["outcome"] != "accepted":
        raise ApiError(*_REFUSALS[row["outcome"]])
    if row["created"]:
        # The shared wake-up of kyrie_engine.queue (one NOTIFY for many
        # concurrent accepts), called rather than written again; on the pool,
        # once the accept's connection is back: most callers only wait for a
        # send in flight, and need not hold a connection meanwhile.
        await queue.wake_workers(pool)
    job_id = row["job_id"]
    headers = {"Location": f"/ai/jobs/{job_id}"}
    if not row["created"]:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse({"job_id": str(job_id)}, status_code=202, headers=headers)


async def get_job(request: Request, job: JobView) -> Response:
    return Response(job.model_dump_json(), media_type="application/json")


async def cancel_job(request: Request, job: JobView) -> Response:
    # Pending or running become cancelled; a finished job comes back unchanged.
    cancelled = await queue.cancel_job(_pool(request), job.id, "cancelled through the API")
    if cancelled is None:  # deleted meanwhile (with its workspace)
        raise ApiError(404, "job not found")
    job = JobView.of(cancelled)
    if job.status in ("completed", "failed"):
        raise ApiError(409, f"the job has already {job.status}; nothing was changed")
    return Response(job.model_dump_json(), media_type="application/json")


async def job_events(request: Request, job: JobView) -> Response:
    """SSE of one job: woken by the shared listener, never polling the database on a timer."""
    runtime = _runtime(request)
    job_id = job.id
    if not runtime.events.enabled:
        raise ApiError(
            503, "live events need a LISTEN connection: DATABASE_URL is a transaction pooler, "
            "so set KYRIE_LISTEN_DATABASE_URL (or follow the job with Supabase Realtime)",
        )
    pool = _pool(request)
    # Set by sse-starlette when the server is stopping: the stream then ends
    # cleanly (its last chunk sent) instead of being cut.
    shutdown = anyio.Event()

    async def close_on_shutdown(follower: Follower) -> None:
        await shutdown.wait()
        follower.closed = True
        follower.wake()

    async def stream() -> AsyncIterator[ServerSentEvent]:
        with runtime.events.follow(job_id) as follower:
            watcher = asyncio.create_task(close_on_shutdown(follower))
            try:
                async for event in _job_events(pool, job_id, follower):
                    yield event
            finally:
                watcher.cancel()

    return EventSourceResponse(
        stream(), ping=runtime.settings.sse_ping_seconds, send_timeout=30,
        shutdown_event=shutdown, shutdown_grace_period=2,
    )


async def _job_events(
    pool: asyncpg.Pool, job_id: uuid.UUID, follower: Follower
) -> AsyncIterator[ServerSentEvent]:
    """The job's state now, then at every change, until it is terminal (or the follower is closed)."""
    sent: str | None = None
    seq = 0
    while True:
        try:
            found = await queue.get_job(pool, job_id)
        except DATABASE_UNAVAILABLE:
            # The listener's reconnect wakes us; the timeout covers a pool-only outage.
            await follower.changed(within=2.0)
            continue
        if found is None:
            return
        job = JobView.of(found)
        data = job.model_dump_json()
        if data != sent:
            seq += 1
            sent = data
            yield ServerSentEvent(data=data, event="job", id=str(seq))
        if job.terminal:
            return
        await follower.changed()
        if follower.closed:
            return


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _database_ok(runtime: Runtime) -> bool:
    if runtime.pool is None:
        return False
    try:
        async with runtime.pool.acquire(timeout=runtime.settings.db_timeout_seconds) as conn:
            await conn.fetchval("select 1", timeout=runtime.settings.db_timeout_seconds)
    except Exception:
        return False
    return True


async def readyz(request: Request) -> Response:
    runtime = _runtime(request)
    checks: dict[str, bool | str] = {
        "database": await _database_ok(runtime),
        "listener": runtime.events.connected if runtime.events.enabled else "disabled",
    }
    if runtime.worker is not None:  # `serve`: the in-process worker hears new jobs too
        checks["worker_listener"] = bool(runtime.worker.listener_connected)
    failing = [name for name, ok in checks.items() if ok is False]
    if failing:
        raise ApiError(503, f"not ready: {', '.join(failing)}", extra={"checks": checks})
    return JSONResponse({"status": "ready", "checks": checks})


async def metrics(request: Request) -> Response:
    runtime = _runtime(request)
    if runtime.pool is None:
        raise ApiError(503, "database unavailable, try again shortly")
    text = await runtime.metrics.render(runtime.pool, within=runtime.settings.db_timeout_seconds)
    return Response(text, media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSONResponse(document(_runtime(request).settings.max_body_bytes))


# Everything under /ai through the factories; the rest is public by design
# (probes, metrics, the document), and tests/test_api_routes.py holds that list.
ROUTES = [
    ai_route("/ai/cfo/analyze", analyze, methods=["POST"]),
    job_route("/ai/jobs/{job_id}", get_job, methods=["GET"]),
    job_route("/ai/jobs/{job_id}/events", job_events, methods=["GET"]),
    job_route("/ai/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


# ---------------------------------------------------------------------------
# the request's frame: id, timing, access line, last-resort 500


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status: int | None = None

        def route() -> str:
            matched = scope.get("route")
            return str(getattr(matched, "path", "unmatched"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-Id"] = rid
                self.metrics.observe_request(
                    route(), scope["method"], status, time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("client went away", extra={"request_id": rid})
        except Exception as exc:
            log.error("unhandled error", extra={"request_id": rid, **describe_exception(exc)})
            if status is None:
                await internal_error()(scope, receive, send_with_id)
        finally:
            if log.isEnabledFor(logging.INFO):  # the line's fields cost more than the check
                log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route(),
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            request_id.reset(token)


def build_app(settings: Settings, *, pool: asyncpg.Pool | None = None, worker: Any = None) -> Starlette:
    """The app; its lifespan opens the pool (unless given) and the shared LISTEN connection.

    The pool starts empty (min_size 0) so the API comes up while the database
    is away and answers 503 and readyz false until it is back.
    """
    secret = settings.require_internal_secret().get_secret_value()
    runtime = Runtime(
        settings=settings,
        secret_digest=hashlib.sha256(secret.encode("latin-1")).digest(),
        metrics=Metrics(),
        events=JobEvents(settings.listen_dsn, timeout=settings.db_timeout_seconds),
        pool=pool,
        worker=worker,
    )
    runtime.metrics.add_gauge(
        "kyrie_events_listener_up", "1 if the shared LISTEN connection is up",
        lambda: runtime.events.connected,
    )
    runtime.metrics.add_gauge(
        "kyrie_sse_followers", "Open job event streams", lambda: runtime.events.follower_count
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own_pool = runtime.pool is None
        if own_pool:
            runtime.pool = await create_pool(
                settings.database_url, min_size=0, max_size=settings.pool_size,
                timeout=settings.db_timeout_seconds, command_timeout=settings.db_timeout_seconds * 6,
                reset=session_unchanged,  # its routes leave no session state (db.py)
            )
        runtime.events.start()
        try:
            yield
        finally:
            await runtime.events.stop()
            if own_pool and runtime.pool is not None:
                await runtime.pool.close()
                runtime.pool = None

    # The operator console (kyrie_engine.console) only when its token is set:
    # otherwise /console is an unknown path (404), like any other.
    console_token = settings.console_token
    routes = ROUTES + (console.routes() if console_token is not None else [])
    app = Starlette(
        routes=routes,
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext, metrics=runtime.metrics)
    app.state.runtime = runtime
    if console_token is not None:
        app.state.console = console.Console(console_token.get_secret_value())
    return app
