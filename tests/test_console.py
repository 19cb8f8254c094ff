"""The console without a browser: switched on by its token, the session and CSRF rules tried as an
attacker would, every action logged with who and what and never the token, and the numbers the
overview and a job's page show checked against jobs written for the purpose.

The browser's view of the same is tests/test_console_browser.py.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from test_api import assert_error_contract
from test_api_support import asgi_client, build
from test_service import KYRIE, _env

from kyrie_engine import queue
from kyrie_engine.console import queries
from kyrie_engine.console.auth import COOKIE, Keys
from kyrie_engine.logs import JsonLines
from kyrie_engine.settings import Settings

TOKEN = "console-test-token-" + "t" * 25
ORIGIN = "http://engine.test"


@dataclass
class Site:
    client: httpx.AsyncClient
    db: asyncpg.Connection
    job: uuid.UUID  # failed, with one recorded attempt

    async def sign_in(self, who: str = "ana", **headers: str) -> httpx.Response:
        return await self.client.post("/console/login", data={"token": TOKEN, "who": who},
                                      headers={"Origin": ORIGIN, **headers})

    async def csrf(self) -> str:
        page = await self.client.get(f"/console/jobs/{self.job}")
        assert page.status_code == 200
        return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def failed_job(db: asyncpg.Connection, kind: str = "console.test", error: str = "boom") -> uuid.UUID:
    job = await queue.enqueue(db, kind, {"n": 1}, max_attempts=1)
    claimed = await queue.claim_jobs(db, "w-test", {kind: 1}, 1, 30)
    assert [c.id for c in claimed] == [job.id]
    await queue.fail_jobs(db, "w-test", [queue.FailedAttempt(job.id, 1, error,
                                                             "Traceback: detail only operators see", False)])
    return job.id


@pytest.fixture
async def site(db: asyncpg.Connection, db_dsn: str) -> AsyncIterator[Site]:
    job = await failed_job(db)
    async with asgi_client(build(db_dsn, console_token=TOKEN)) as client:
        yield Site(client, db, job)


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """Every log line, as the service's formatter writes it (with the secrets it masks)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLines([TOKEN]))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def snapshot(db: asyncpg.Connection) -> list[Any]:
    return [tuple(r) for r in await db.fetch("select id, status, attempts, updated_at from jobs order by id")]


# ---------------------------------------------------------------------------
# on, off, and the token's own rules


async def test_without_a_token_the_console_does_not_exist(db_dsn: str) -> None:
    async with asgi_client(build(db_dsn)) as client:
        for path in ("/console", "/console/login", "/console/static/console.css"):
            assert_error_contract(await client.get(path), 404)


@pytest.mark.parametrize(("token", "ok"), [("t" * 31, False), (" " + "t" * 40, False), ("t" * 32, True)])
def test_the_token_must_be_32_characters(token: str, ok: bool) -> None:
    values = {"database_url": "postgresql://u@h/db", "console_token": token}
    if ok:
        assert token in Settings(**values).secrets()
    else:
        with pytest.raises(ValueError, match=r"console_token|KYRIE_CONSOLE_TOKEN"):
            Settings(**values)


def test_a_short_token_stops_the_service_with_one_line_naming_it() -> None:
    done = subprocess.run([KYRIE, "api"], env=_env(KYRIE_CONSOLE_TOKEN="short-token-" + "s" * 10),
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "KYRIE_CONSOLE_TOKEN" in lines[0], done.stderr
    assert "short-token-" not in done.stdout + done.stderr


# ---------------------------------------------------------------------------
# signing in


async def test_signing_in_gives_a_strict_httponly_cookie_and_never_shows_the_token(
    site: Site, logged: io.StringIO
) -> None:
    response = await site.sign_in()
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would never come back
    pages = [await site.client.get(p) for p in ("/console", "/console/jobs", f"/console/jobs/{site.job}")]
    for page in [response, *pages]:
        assert TOKEN not in page.text and TOKEN not in str(page.url) and TOKEN not in str(page.headers)
    assert all(p.status_code == 200 for p in pages)
    assert "all workspaces" in pages[0].text
    assert TOKEN not in logged.getvalue()
    sign_in = [json.loads(line) for line in logged.getvalue().splitlines() if "console sign-in" in line]
    assert sign_in and sign_in[0]["who"] == "ana"


async def test_behind_https_the_cookie_is_secure(site: Site) -> None:
    response = await site.sign_in(**{"X-Forwarded-Proto": "https", "Origin": "https://engine.test"})
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"]


@pytest.mark.parametrize(
    ("form", "headers", "status"),
    [
        ({"token": "wrong-" + "x" * 40}, {"Origin": ORIGIN}, 401),
        ({"token": TOKEN[:-1]}, {"Origin": ORIGIN}, 401),
        ({"token": TOKEN + " "}, {"Origin": ORIGIN}, 401),
        ({"who": "ana"}, {"Origin": ORIGIN}, 401),
        ({"token": TOKEN}, {"Origin": "https://evil.test"}, 403),  # login CSRF: someone else's page
        ({"token": TOKEN}, {}, 403),
    ],
    ids=["wrong", "one-short", "trailing-space", "none", "foreign-origin", "no-origin"],
)
async def test_a_wrong_sign_in_gets_no_session_and_no_job(
    site: Site, logged: io.StringIO, form: dict[str, str], headers: dict[str, str], status: int
) -> None:
    response = await site.client.post("/console/login", data=form, headers=headers)
    assert response.status_code == status
    assert "set-cookie" not in response.headers
    assert str(site.job) not in response.text and TOKEN not in response.text
    assert (await site.client.get("/console")).status_code == 303
    assert TOKEN not in logged.getvalue()


async def test_a_forged_tampered_or_expired_cookie_is_no_session(site: Site) -> None:
    keys = Keys(TOKEN)
    _, good = keys.new_session("ana")
    payload, mac = good.split(".")
    other = Keys("some-other-console-token-" + "o" * 20).new_session("mallory")[1]
    import base64

    elevated = base64.urlsafe_b64encode(
        json.dumps({"sid": "x", "who": "root", "exp": int(time.time()) + 99}).encode()).decode().rstrip("=")
    expired_keys = Keys(TOKEN)
    session, _ = expired_keys.new_session("ana")
    stale = json.dumps({"sid": session.sid, "who": "ana", "exp": int(time.time()) - 1}).encode()
    stale_payload = base64.urlsafe_b64encode(stale).decode().rstrip("=")
    stale_cookie = f"{stale_payload}.{base64.urlsafe_b64encode(expired_keys._mac(b'session', stale_payload.encode())).decode().rstrip('=')}"  # noqa: E501
    for cookie in (other, f"{elevated}.{mac}", f"{payload}.", f"{payload}.{mac}x", "a.b.c", stale_cookie):
        site.client.cookies.clear()
        site.client.cookies.set(COOKIE, cookie, domain="engine.test", path="/console")
        response = await site.client.get(f"/console/jobs/{site.job}")
        assert response.status_code == 303 and response.headers["location"] == "/console/login", cookie
        assert str(site.job) not in response.text
    site.client.cookies.clear()
    site.client.cookies.set(COOKIE, good, domain="engine.test", path="/console")
    assert (await site.client.get(f"/console/jobs/{site.job}")).status_code == 200


# ---------------------------------------------------------------------------
# state-changing requests


@pytest.mark.parametrize(
    ("csrf", "origin", "referer", "needle"),
    [
        (None, ORIGIN, None, "CSRF"),
        ("", ORIGIN, None, "CSRF"),
        ("wrong", ORIGIN, None, "CSRF"),
        ("{other}", ORIGIN, None, "CSRF"),  # another session's token
        ("{csrf}", "https://evil.test", None, "Origin"),
        ("{csrf}", "null", None, "Origin"),
        ("{csrf}", None, None, "Origin"),
        ("{csrf}", None, "https://evil.test/console", "Origin"),
    ],
    ids=["no-token", "empty", "wrong", "other-session", "foreign-origin", "null-origin", "no-origin",
         "foreign-referer"],
)
@pytest.mark.parametrize("action", ["retry", "cancel"])
async def test_a_post_without_the_csrf_token_or_from_elsewhere_is_refused(
    site: Site, action: str, csrf: str | None, origin: str | None, referer: str | None, needle: str
) -> None:
    await site.sign_in()
    mine = await site.csrf()
    other = Keys(TOKEN).csrf_token(Keys(TOKEN).new_session("bo")[0])
    before = await snapshot(site.db)
    form = {} if csrf is None else {"csrf": csrf.format(csrf=mine, other=other)}
    headers = {k: v for k, v in (("Origin", origin), ("Referer", referer)) if v is not None}
    response = await site.client.post(f"/console/jobs/{site.job}/{action}", data=form, headers=headers)
    assert needle in assert_error_contract(response, 403)["message"]
    assert await snapshot(site.db) == before


async def test_retry_and_cancel_call_the_queue_functions_and_are_logged(
    site: Site, logged: io.StringIO
) -> None:
    await site.sign_in(who="ana")
    csrf = await site.csrf()
    response = await site.client.post(f"/console/jobs/{site.job}/retry", data={"csrf": csrf},
                                      headers={"Origin": ORIGIN})
    assert response.status_code == 303 and response.headers["location"].endswith("?done=retried")
    job = await queue.get_job(site.db, site.job)
    assert job is not None and job.status == "pending" and job.attempts == 0
    # The same-origin Referer is enough when a browser leaves Origin out.
    response = await site.client.post(f"/console/jobs/{site.job}/cancel", data={"csrf": csrf},
                                      headers={"Referer": f"{ORIGIN}/console/jobs/{site.job}"})
    assert response.headers["location"].endswith("?done=cancelled")
    job = await queue.get_job(site.db, site.job)
    assert job is not None and job.status == "cancelled" and job.error == "cancelled in the console by ana"
    again = await site.client.post(f"/console/jobs/{site.job}/cancel", data={"csrf": csrf},
                                   headers={"Origin": ORIGIN})
    assert again.headers["location"].endswith("?done=unchanged")
    actions = [json.loads(line) for line in logged.getvalue().splitlines() if '"console action"' in line]
    assert [(a["who"], a["action"], a["job_id"], a["was"], a["now"]) for a in actions] == [
        ("ana", "retry", str(site.job), "failed", "pending"),
        ("ana", "cancel", str(site.job), "pending", "cancelled"),
        ("ana", "cancel", str(site.job), "cancelled", "cancelled"),
    ]
    assert TOKEN not in logged.getvalue()


async def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(site: Site) -> None:
    await site.sign_in()
    csrf = await site.csrf()
    refused = await site.client.post("/console/logout", data={}, headers={"Origin": ORIGIN})
    assert_error_contract(refused, 403)
    response = await site.client.post("/console/logout", data={"csrf": csrf}, headers={"Origin": ORIGIN})
    assert response.status_code == 303 and 'kyrie_console=""' in response.headers["set-cookie"]


async def test_pages_forbid_framing_and_foreign_resources(site: Site) -> None:
    await site.sign_in()
    page = await site.client.get("/console")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert "http://" not in page.text.replace(ORIGIN, "") and "https://" not in page.text


# ---------------------------------------------------------------------------
# what the pages say


async def test_the_overview_counts_and_charts_what_the_queue_holds(db: asyncpg.Connection) -> None:
    now = await db.fetchval("select now()")
    await queue.enqueue(db, "a.kind", {})
    await db.execute("update jobs set created_at = now() - interval '90 seconds', "
                     "run_at = now() - interval '90 seconds'")
    await queue.enqueue(db, "a.kind", {}, run_at=now + dt.timedelta(hours=1))
    await failed_job(db, "b.kind", "the bank said no")
    # Two finished a minute ago: 2 s and 4 s after they were due, 100 and 50 tokens.
    for waited, tokens in ((2, 100), (4, 50)):
        job = await queue.enqueue(db, "a.kind", {})
        await db.execute(
            "update jobs set status = 'completed', run_at = now() - interval '70 s', "
            "created_at = now() - interval '80 s', "
            "started_at = now() - interval '70 s' + $2 * interval '1 s', "
            "finished_at = now() - interval '60 s', usage = jsonb_build_object('total_tokens', $3::int) "
            "where id = $1", job.id, waited, tokens)
    await db.execute(
        "insert into kyrie.workers (id, hostname, pid) values ('w-live', 'box', 7), ('w-gone', 'old', 8)")
    await db.execute("update kyrie.workers set last_seen = now() - interval '1 hour' where id = 'w-gone'")

    data = await queries.overview(db, "hour")
    kinds = {r["kind"]: dict(r) for r in data.kinds}
    assert kinds["a.kind"]["pending"] == 1 and kinds["a.kind"]["scheduled"] == 1
    assert 85 <= kinds["a.kind"]["oldest_pending_seconds"] <= 120
    assert kinds["b.kind"]["failed_day"] == 1 and kinds["b.kind"]["pending"] == 0
    assert [f["error"] for f in data.failures] == ["the bank said no"]
    assert [w["id"] for w in data.workers] == ["w-live"]
    assert len(data.series) in (60, 61) and data.bucket_minutes == 1
    busy = [r for r in data.series if r["completed"] or r["failed"]]
    done = [r for r in busy if r["completed"]]
    assert sum(r["completed"] for r in done) == 2 and sum(r["tokens"] for r in data.series) == 150
    assert len(done) == 1 and done[0]["latency_p50_ms"] == pytest.approx(3000)
    assert done[0]["latency_p99_ms"] == pytest.approx(3980)
    day = await queries.overview(db, "day")
    assert len(day.series) in (96, 97) and sum(r["completed"] for r in day.series) == 2


async def test_a_job_page_tells_the_whole_story(site: Site) -> None:
    await site.sign_in()
    page = (await site.client.get(f"/console/jobs/{site.job}")).text
    for shown in ("enqueued", "attempt 1 failed", "w-test", "boom", "detail only operators see",
                  '&#34;n&#34;: 1', 'id="retry"'):
        assert shown in page, shown
    assert 'id="cancel"' not in page  # a failed job has nothing to cancel
    listing = (await site.client.get("/console/jobs?status=failed")).text
    assert str(site.job)[:8] in listing
    assert_error_contract(await site.client.get(f"/console/jobs/{uuid.uuid4()}"), 404)
    assert_error_contract(await site.client.get("/console/jobs/not-a-uuid"), 404)


async def test_job_lists_page_newest_first_without_gaps_or_repeats(db: asyncpg.Connection) -> None:
    """Waiting jobs by when they were enqueued, finished ones by when they
    finished; 120 of each, in pages of 50, with ties (a batch finishes at one
    `now()`), every job exactly once."""
    await queue.enqueue_many(db, "page.kind", [{"i": i} for i in range(240)])
    await db.execute("update jobs set created_at = now() - (payload->>'i')::int * interval '1 s'")
    finished = [r["id"] for r in await db.fetch(
        "update jobs set status = 'completed',"
        " finished_at = now() - ((payload->>'i')::int / 4) * interval '1 s'"
        " where (payload->>'i')::int % 2 = 1 returning id")]

    async def pages(status: str) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = []
        before = None
        while True:
            page = await queries.jobs_page(db, status, "page.kind", before)
            rows += page
            if len(page) < 50:
                return rows
            before = (page[-1][queries.page_time(status)], page[-1]["id"])

    done = await pages("completed")
    assert sorted(r["id"] for r in done) == sorted(finished)
    assert [(r["finished_at"], r["id"]) for r in done] == sorted(
        ((r["finished_at"], r["id"]) for r in done), reverse=True)
    waiting = await pages("pending")
    assert len(waiting) == 120 and not {r["id"] for r in waiting} & set(finished)
    assert [(r["created_at"], r["id"]) for r in waiting] == sorted(
        ((r["created_at"], r["id"]) for r in waiting), reverse=True)


async def test_a_cfo_job_page_shows_its_usage_result_and_proposed_actions(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    from cfo_support import PERIOD, actions_of, analyse, build_books

    books = await build_books(db)
    job = await analyse(db_dsn, db, books.workspace_id, books.owner, PERIOD)
    assert job["status"] == "completed"
    actions = await actions_of(db, job["id"])
    await db.execute("update ai_actions set status = 'accepted' where id = $1", actions[0]["id"])
    async with asgi_client(build(db_dsn, console_token=TOKEN)) as client:
        site = Site(client, db, job["id"])
        await site.sign_in()
        page = (await client.get(f"/console/jobs/{job['id']}")).text
    assert f"Proposed actions <span class=\"muted\">({len(actions)})</span>" in page
    for action in actions:
        assert f"<code>{action['type']}</code>" in page
    assert 'class="pill accepted"' in page and 'class="pill proposed"' in page
    assert "total_tokens" in page and "narrative" in page and "attempt 1 completed" in page
    assert str(books.workspace_id) in page  # an operator's view names the workspace


async def test_the_schedules_page_shows_each_schedule_its_last_job_and_next_slot(site: Site) -> None:
    await site.sign_in()
    assert "No schedules yet" in (await site.client.get("/console/schedules")).text
    await site.db.execute(
        "insert into kyrie.schedules (name, cron, timezone, kind, enabled)"
        " values ('monday-cfo', '0 7 * * 1', 'Europe/Paris', 'cfo.analyze', true),"
        "        ('paused', '*/5 * * * *', 'UTC', 'test.kind', false)"
    )
    page = (await site.client.get("/console/schedules")).text
    for shown in ("monday-cfo", "0 7 * * 1", "Europe/Paris", "cfo.analyze", "enabled", "paused", "disabled"):
        assert shown in page, shown
    assert TOKEN not in page


async def test_the_budget_shows_each_models_limits_and_what_was_spent(site: Site) -> None:
    await site.sign_in()
    assert "No model budget yet" in (await site.client.get("/console/schedules")).text
    await site.db.execute("select kyrie.seed_model_budget('llama-3.3-70b-versatile', 30, 12000, 1000, null)")
    await site.db.execute("select kyrie.take_model_budget('llama-3.3-70b-versatile', 900)")
    page = (await site.client.get("/console/schedules")).text
    for shown in ("Groq budget", "llama-3.3-70b-versatile", "/ 30", "/ 12000", "/ 1000", "<meter"):
        assert shown in page, shown
