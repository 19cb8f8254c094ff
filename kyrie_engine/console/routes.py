"""The console's routes, each built by `console_route`, so none can forget the session.

A console route answers only a signed-in operator (a valid session cookie,
kyrie_engine.console.auth); a state-changing one also needs the form's CSRF
token and this console's own Origin.  Without a session a page redirects to
the sign-in form and anything else gets 401 `{"message": ...}`; nothing of
the queue is in either answer.  Only the sign-in form and the two static
files are public.  tests/test_api_routes.py walks every /console route of
the built app and proves it.

Every action (sign-in, failed sign-in, sign-out, retry, cancel) is logged
with who (the name given at sign-in and the session's id) and what.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from kyrie_engine import notifier, queue
from kyrie_engine.console import charts, queries
from kyrie_engine.console.auth import COOKIE, SESSION_SECONDS, Keys, Session, clean_who, is_https, same_origin
from kyrie_engine.http_errors import ApiError

log = logging.getLogger("kyrie_engine.console")

PREFIX = "/console"
FORM_LIMIT = 4096
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
STATUSES = ("failed", "pending", "running", "completed", "cancelled")
# What a console page may load: only itself (the charts are inline SVG, the
# script and the stylesheet are files of this package).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; "
    "img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LIVE_EVERY = 5.0  # seconds between refreshes with no notification (ages and charts move on)
LIVE_AT_MOST = 1.0  # seconds between two renders, however busy the queue


class Console:
    """What the console's routes share: the keys derived from the token and the templates."""

    def __init__(self, token: str) -> None:
        self.keys = Keys(token)
        self.templates = Environment(
            loader=PackageLoader("kyrie_engine.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True, lstrip_blocks=True,
        )
        self.templates.filters.update(ago=_ago, when=_when, pretty=_pretty, duration=_duration)
        self.templates.globals.update(prefix=PREFIX)


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _runtime(request: Request) -> Any:
    return request.app.state.runtime


def _pool(request: Request) -> Any:
    pool = _runtime(request).pool
    if pool is None:
        raise ApiError(503, "database unavailable, try again shortly")
    return pool


# ---------------------------------------------------------------------------
# formatting for the templates


def _ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = ((now or dt.datetime.now(dt.UTC)) - value).total_seconds()
    return _duration(seconds) + (" ago" if seconds >= 0 else " from now")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = abs(float(seconds))
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------
# the rules


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    session: Session | None = request.scope.get("console_session")
    console = _console(request)
    html = console.templates.get_template(name).render(
        session=session, csrf=console.keys.csrf_token(session) if session else "", **context
    )
    return HTMLResponse(html, status_code=status, headers=HEADERS)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form of at most FORM_LIMIT bytes; one value per name (the first)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise ApiError(413, f"form too large (limit {FORM_LIMIT} bytes)")
    if not body:
        return {}  # an empty form: its missing fields are refused by name below
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "send the console's form (application/x-www-form-urlencoded)")
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
    return {key: values[0] for key, values in parsed.items()}


Endpoint = Callable[[Request], Awaitable[Response]]
FormEndpoint = Callable[[Request, Session, dict[str, str]], Awaitable[Response]]


def console_route(path: str, endpoint: Endpoint, methods: list[str]) -> Route:
    """A route for signed-in operators; POST routes also need the CSRF token and the Origin."""

    async def signed_in(request: Request) -> Response:
        session = _console(request).keys.session_of(request.cookies.get(COOKIE))
        if session is None:
            if request.method == "GET":
                return RedirectResponse(f"{PREFIX}/login", status_code=303, headers=HEADERS)
            raise ApiError(401, "sign in to the console first")
        request.scope["console_session"] = session
        return await endpoint(request)

    signed_in.__name__ = signed_in.__qualname__ = endpoint.__name__
    return Route(PREFIX + path, signed_in, methods=methods, name=f"console_{endpoint.__name__}")


def console_action(path: str, endpoint: FormEndpoint) -> Route:
    """A POST that changes something: session (console_route), then Origin, then CSRF token."""

    async def checked(request: Request) -> Response:
        if not same_origin(request):
            raise ApiError(403, "this form must be sent from the console's own pages (Origin)")
        form = await read_form(request)
        session: Session = request.scope["console_session"]
        if not _console(request).keys.csrf_matches(session, form.get("csrf")):
            raise ApiError(403, "the form's CSRF token is missing or wrong: reload the page")
        return await endpoint(request, session, form)

    checked.__name__ = endpoint.__name__
    return console_route(path, checked, methods=["POST"])


def _job_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["job_id"])
    except ValueError:
        raise ApiError(404, "job not found") from None


def _acted(session: Session, action: str, **what: Any) -> None:
    log.info("console action", extra={"who": session.who, "session": session.sid[:8], "action": action,
                                      **{k: str(v) for k, v in what.items()}})


# ---------------------------------------------------------------------------
# signing in and out (public: the form, and the POST that checks the token)


async def login_form(request: Request) -> Response:
    return render(request, "login.html")


async def login(request: Request) -> Response:
    if not same_origin(request):
        raise ApiError(403, "sign in from the console's own page (Origin)")
    form = await read_form(request)
    keys = _console(request).keys
    client = request.client.host if request.client else "?"
    who = clean_who(form.get("who", ""))
    if not keys.token_matches(form.get("token", "")):
        log.warning("console sign-in refused", extra={"who": who, "client": client})
        await asyncio.sleep(0.2)  # a guess costs something; the token is 32+ characters anyway
        return render(request, "login.html", status=401, error="That is not the console token.", who=who)
    session, cookie = keys.new_session(who)
    log.info("console sign-in", extra={"who": who, "session": session.sid[:8], "client": client})
    response = RedirectResponse(f"{PREFIX}", status_code=303, headers=HEADERS)
    response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, path=PREFIX, httponly=True,
                        samesite="strict", secure=is_https(request))
    return response


async def logout(request: Request, session: Session, form: dict[str, str]) -> Response:
    _acted(session, "sign-out")
    response = RedirectResponse(f"{PREFIX}/login", status_code=303, headers=HEADERS)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=is_https(request))
    return response


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        raise ApiError(404, "not found")
    text = resources.files("kyrie_engine.console").joinpath("static", name).read_bytes()
    return Response(text, media_type=STATIC[name], headers={"Cache-Control": "max-age=300",
                                                             "X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------------------
# pages


def _range(request: Request) -> str:
    chosen = request.query_params.get("range", "hour")
    return chosen if chosen in queries.RANGES else "hour"


def overview_context(data: queries.Overview) -> dict[str, Any]:
    unit = "/min" if data.bucket_minutes == 1 else f"/{data.bucket_minutes} min"
    return {
        "o": data,
        "totals": {k: sum(int(r[k]) for r in data.kinds)
                   for k in ("pending", "scheduled", "running", "failed_day")},
        "finished_chart": charts.stacked_bars(
            data.series, [("completed", "ok", "completed"), ("failed", "bad", "failed")],
            f"jobs finished {unit}"),
        "latency_chart": charts.lines(
            data.series, [("latency_p50_ms", "p50", "p50"), ("latency_p99_ms", "p99", "p99")],
            "pickup latency (ms)"),
        "tokens_chart": charts.stacked_bars(
            data.series, [("tokens", "tok", "tokens")], f"Groq tokens {unit}"),
        "unit": unit,
    }


async def _overview_html(request: Request, range_: str) -> str:
    async with _pool(request).acquire() as conn:
        data = await queries.overview(conn, range_)
    template = _console(request).templates.get_template("_overview_live.html")
    return template.render(**overview_context(data))


async def overview(request: Request) -> Response:
    range_ = _range(request)
    # The live part is rendered by the same autoescaping templates, then placed as is.
    live = Markup(await _overview_html(request, range_))  # noqa: S704
    return render(request, "overview.html", live=live, range=range_, page="overview")


@contextlib.asynccontextmanager
async def _any_change(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set by every notification of the process's notifier (a hint to re-read)."""
    changed = asyncio.Event()
    dsn = _runtime(request).settings.listen_dsn
    if dsn is None:  # a transaction pooler only: the page refreshes on the timer
        yield changed
        return
    shared = notifier.shared(dsn)
    unsubscribe = shared.subscribe(lambda _event: changed.set(), changed.set)
    shared.start()
    try:
        yield changed
    finally:
        unsubscribe()
        await shared.stop()


def _live(request: Request, render_html: Callable[[], Awaitable[str]]) -> Response:
    """SSE of a page's live part, re-rendered on a notification (at most once a second) or every
    LIVE_EVERY seconds; the page's script swaps it in."""

    # Set by sse-starlette when the server stops: the stream then ends at once
    # instead of holding the graceful shutdown for its whole grace period.
    shutdown = anyio.Event()

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with _any_change(request) as changed:

            async def on_shutdown() -> None:
                await shutdown.wait()
                changed.set()

            watcher = asyncio.create_task(on_shutdown())
            try:
                sent = None
                while not shutdown.is_set():
                    started = time.monotonic()
                    changed.clear()
                    html = await render_html()
                    if html != sent:
                        sent = html
                        yield ServerSentEvent(data=html, event="html")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), LIVE_EVERY)
                    if not shutdown.is_set():
                        await asyncio.sleep(max(0.0, LIVE_AT_MOST - (time.monotonic() - started)))
            finally:
                watcher.cancel()

    return EventSourceResponse(stream(), ping=15, send_timeout=30, headers={"Cache-Control": "no-store"},
                               shutdown_event=shutdown, shutdown_grace_period=2)


async def overview_live(request: Request) -> Response:
    range_ = _range(request)
    return _live(request, lambda: _overview_html(request, range_))


async def jobs(request: Request) -> Response:
    status = request.query_params.get("status", "failed")
    if status not in STATUSES:
        status = "failed"
    kind = request.query_params.get("kind") or None
    before = None
    at, last = request.query_params.get("before_at"), request.query_params.get("before_id")
    if at and last:
        try:
            before = (dt.datetime.fromisoformat(at), uuid.UUID(last))
        except ValueError:
            raise ApiError(400, "before_at and before_id must be a time and a job id") from None
    async with _pool(request).acquire() as conn:
        rows = await queries.jobs_page(conn, status, kind, before)
    more = None
    if len(rows) == 50:
        tail = rows[-1]
        more = (f"?status={status}" + (f"&kind={quote(kind)}" if kind else "")
                + f"&before_at={quote(tail[queries.page_time(status)].isoformat())}&before_id={tail['id']}")
    return render(request, "jobs.html", rows=rows, current=status, kind=kind, statuses=STATUSES, more=more,
                  page="jobs", time_column=queries.page_time(status))


async def schedules(request: Request) -> Response:
    async with _pool(request).acquire() as conn:
        rows = await queries.schedules(conn)
        budgets = await queries.budgets(conn)
    return render(request, "schedules.html", schedules=rows, budgets=budgets, page="schedules")


async def _job_html(request: Request, job_id: uuid.UUID) -> str | None:
    async with _pool(request).acquire() as conn:
        story = await queries.job_story(conn, job_id)
    if story is None:
        return None
    session: Session = request.scope["console_session"]
    console = _console(request)
    return console.templates.get_template("_job_live.html").render(
        s=story, j=story.job, csrf=console.keys.csrf_token(session)
    )


async def job(request: Request) -> Response:
    job_id = _job_id(request)
    html = await _job_html(request, job_id)
    if html is None:
        raise ApiError(404, "job not found")
    done = request.query_params.get("done")
    return render(request, "job.html", live=Markup(html), job_id=job_id, page="jobs",  # noqa: S704
                  done=done if done in ("retried", "cancelled", "unchanged") else None)


async def job_live(request: Request) -> Response:
    job_id = _job_id(request)

    async def html() -> str:
        return await _job_html(request, job_id) or "<p class='empty'>This job no longer exists.</p>"

    return _live(request, html)


async def retry(request: Request, session: Session, form: dict[str, str]) -> Response:
    job_id = _job_id(request)
    before = await queue.get_job(_pool(request), job_id)
    if before is None:
        raise ApiError(404, "job not found")
    after = await queue.retry_job(_pool(request), job_id)
    changed = after is not None and after.updated_at != before.updated_at
    _acted(session, "retry", job_id=job_id, was=before.status, now=after.status if after else "gone")
    if changed:
        async with _pool(request).acquire() as conn:
            await queue.wake_workers(conn)
    return RedirectResponse(f"{PREFIX}/jobs/{job_id}?done={'retried' if changed else 'unchanged'}",
                            status_code=303, headers=HEADERS)


async def cancel(request: Request, session: Session, form: dict[str, str]) -> Response:
    job_id = _job_id(request)
    before = await queue.get_job(_pool(request), job_id)
    if before is None:
        raise ApiError(404, "job not found")
    after = await queue.cancel_job(_pool(request), job_id, f"cancelled in the console by {session.who}")
    changed = after is not None and after.status == "cancelled" and before.status != "cancelled"
    _acted(session, "cancel", job_id=job_id, was=before.status, now=after.status if after else "gone")
    return RedirectResponse(f"{PREFIX}/jobs/{job_id}?done={'cancelled' if changed else 'unchanged'}",
                            status_code=303, headers=HEADERS)


# Public by design: the sign-in form and its POST (the token is the check), the
# stylesheet and the script.  tests/test_api_routes.py holds the same list.
PUBLIC = {f"{PREFIX}/login", f"{PREFIX}/static/{{name}}"}


def routes() -> list[Route]:
    """The console's routes.  A page is a query in queries.py, a template, and one
    `console_route` line; the walker in tests/test_api_routes.py then covers it."""
    return [
        Route(f"{PREFIX}/login", login_form, methods=["GET"], name="console_login_form"),
        Route(f"{PREFIX}/login", login, methods=["POST"], name="console_login"),
        Route(f"{PREFIX}/static/{{name}}", static, methods=["GET"], name="console_static"),
        console_route("", overview, methods=["GET"]),
        console_route("/live", overview_live, methods=["GET"]),
        console_route("/jobs", jobs, methods=["GET"]),
        console_route("/jobs/{job_id}", job, methods=["GET"]),
        console_route("/jobs/{job_id}/live", job_live, methods=["GET"]),
        console_route("/schedules", schedules, methods=["GET"]),
        console_action("/jobs/{job_id}/retry", retry),
        console_action("/jobs/{job_id}/cancel", cancel),
        console_action("/logout", logout),
    ]
