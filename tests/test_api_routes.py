"""Every route of the built app, walked: none answers without the secret, none under /ai without a user,
none under /console without a signed-in operator's session.

The walk reads the routes from the app itself, so a route added later is
walked too: one built without `ai_route`/`job_route` (or a new public one not
listed in PUBLIC) fails here.  The walker is also run on an app with such a
route added on purpose, to show it can fail.

Then the finding of issue 11 as it was tried: a job read, streamed and
cancelled with the secret and no user, with `USER_ID=`, with the user twice,
with a crafted job id pushed through an unencoded proxy; each refused with the
`{message}` contract, and nothing changed in the database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import add_member, new_user, new_workspace
from test_api import assert_error_contract
from test_api_support import SECRET, asgi_client, build

from kyrie_engine import console, queue
from kyrie_engine.api import job_route

USER = "X-Kyrie-User-Id"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
CONSOLE_TOKEN = "walker-console-token-" + "w" * 20
# Cookies a console route must not take for a session: none, garbage, and a
# well-formed session signed with another token.
FORGED = console.Console("another-console-token-" + "x" * 20).keys.new_session("mallory")[1]
NO_SESSION = [None, "garbage", FORGED, FORGED.split(".")[0] + "." + FORGED.split(".")[0]]


@dataclass
class World:
    app: Starlette
    client: httpx.AsyncClient
    db: asyncpg.Connection
    workspace: uuid.UUID
    member: uuid.UUID
    stranger: uuid.UUID
    job: uuid.UUID  # pending, in the member's workspace


@pytest.fixture
async def world(db: asyncpg.Connection, db_dsn: str) -> AsyncIterator[World]:
    owner, member, stranger = [await new_user(db) for _ in range(3)]
    workspace = await new_workspace(db, owner)
    await add_member(db, workspace, member, "member")
    await new_workspace(db, stranger, "Elsewhere")
    job = (await queue.enqueue(db, "cfo.analyze", {}, workspace_id=workspace, user_id=owner)).id
    app = build(db_dsn, console_token=CONSOLE_TOKEN)
    async with asgi_client(app) as client:
        yield World(app, client, db, workspace, member, stranger, job)


async def snapshot(db: asyncpg.Connection) -> list[Any]:
    """Everything a refused request could have changed."""
    rows = await db.fetch(
        "select id, status, attempts, updated_at, error from public.jobs order by id"
    )
    return [tuple(r) for r in rows]


def _request(world: World, route: Route, method: str, user: str | None, *,
             headers: list[tuple[str, str]] | None = None, query: str = "") -> dict[str, Any]:
    """A request the route would accept from the member, with `user` in the ways a route may take it."""
    path = route.path
    for name in route.param_convertors:
        assert name == "job_id", f"teach the walker the path parameter {{{name}}} of {route.path}"
        path = path.replace("{job_id}", str(world.job))
    body: dict[str, Any] = {"workspace_id": str(world.workspace)}
    if user is not None:
        body["user_id"] = user
    sent = headers if headers is not None else ([(USER, user)] if user is not None else [])
    return {
        "method": method,
        "url": path + (f"?{query}" if query else ""),
        "headers": [("X-Internal-Secret", SECRET), *sent],
        "json": body,
    }


# Each way a request may lack a valid user, and the statuses that refuse it.
def refusals(world: World) -> list[tuple[str, str | None, dict[str, Any], set[int]]]:
    member, stranger = str(world.member), str(world.stranger)
    return [
        ("no user", None, {}, {400, 422}),
        ("a stranger", stranger, {}, {403, 404}),
        ("malformed", "not-a-uuid", {}, {422}),
        ("unbraced variant", "{" + member + "}", {}, {422}),
        ("the user twice", member, {"headers": [(USER, member), (USER, member)]}, {400}),
        ("stranger then member", member, {"headers": [(USER, stranger), (USER, member)]}, {400}),
        ("query instead of header", member, {"headers": [], "query": f"user_id={member}"}, {400}),
        ("USER_ID= in the query", member, {"headers": [], "query": f"USER_ID={member}"}, {400}),
        ("header and query", member, {"query": f"user_id={stranger}"}, {400}),
    ]


async def _console_refusals(world: World, route: Route, method: str) -> list[str]:
    """The console's rule: without a valid session, a page redirects to sign-in and anything
    else is 401 `{message}`; neither answer names the job."""
    wrong: list[str] = []
    path = route.path.replace("{job_id}", str(world.job))
    for cookie in NO_SESSION:
        headers = {"Origin": "http://engine.test", "Cookie": f"kyrie_console={cookie}"} if cookie else {
            "Origin": "http://engine.test"}
        response = await world.client.request(method, path, headers=headers, data={"csrf": "x"})
        name = f"{method} {route.path} with cookie {cookie and cookie[:10]!r}"
        if method == "GET":
            if response.status_code != 303 or response.headers.get("location") != "/console/login":
                wrong.append(f"{name}: {response.status_code}")
        elif response.status_code != 401:
            wrong.append(f"{name}: {response.status_code}")
        else:
            assert_error_contract(response, 401)
        if str(world.job) in response.text:
            wrong.append(f"{name}: the answer names the job")
    return wrong


async def walk(world: World) -> list[str]:
    """What each guarded route did wrong (empty: every rule held); the database is checked too."""
    wrong: list[str] = []
    before = await snapshot(world.db)
    for route in world.app.routes:
        assert isinstance(route, Route), f"{route!r}: the walker knows plain routes only"
        for method in sorted((route.methods or set()) - {"HEAD"}):
            name = f"{method} {route.path}"
            if route.path in PUBLIC or route.path in console.PUBLIC:
                continue
            if route.path.startswith("/console"):
                wrong += await _console_refusals(world, route, method)
                continue
            no_secret = _request(world, route, method, str(world.member))
            no_secret["headers"] = [h for h in no_secret["headers"] if h[0] != "X-Internal-Secret"]
            response = await world.client.request(**no_secret)
            if response.status_code != 401:
                wrong.append(f"{name} without the secret: {response.status_code}")
            for case, user, changes, statuses in refusals(world):
                response = await world.client.request(**_request(world, route, method, user, **changes))
                if response.status_code not in statuses:
                    wrong.append(f"{name} with {case}: {response.status_code}")
                else:
                    assert_error_contract(response, response.status_code)
    if await snapshot(world.db) != before:
        wrong.append("a refused request changed the jobs")
    return wrong


async def test_every_route_refuses_without_the_secret_and_without_a_valid_user(world: World) -> None:
    assert await walk(world) == []
    guarded = {r.path for r in world.app.routes if isinstance(r, Route)} - PUBLIC - console.PUBLIC
    assert {p for p in guarded if not p.startswith("/console")} == {
        "/ai/cfo/analyze", "/ai/jobs/{job_id}", "/ai/jobs/{job_id}/events", "/ai/jobs/{job_id}/cancel"}
    assert {p for p in guarded if p.startswith("/console")} == {
        "/console", "/console/live", "/console/jobs", "/console/jobs/{job_id}", "/console/jobs/{job_id}/live",
        "/console/jobs/{job_id}/retry", "/console/jobs/{job_id}/cancel", "/console/logout",
        "/console/schedules"}
    assert await world.db.fetchval("select count(*) from public.jobs") == 1


async def test_the_walked_requests_are_accepted_from_the_member(world: World) -> None:
    """The control: with the member and nothing else wrong, each route answers 2xx, so the refusals
    above are the rule's doing.  The job is cancelled first, so its stream ends at once (the
    in-process transport reads a response to its end) and the cancel changes nothing."""
    await queue.cancel_job(world.db, world.job)
    for route in world.app.routes:
        if route.path in PUBLIC or route.path.startswith("/console"):  # type: ignore[attr-defined]
            continue  # the console's sessions: tests/test_console.py
        for method in sorted(route.methods - {"HEAD"}):  # type: ignore[attr-defined]
            request = world.client.build_request(**_request(world, route, method, str(world.member)))  # type: ignore[arg-type]
            response = await world.client.send(request, stream=True)
            await response.aclose()
            assert 200 <= response.status_code < 300, (method, route.path, response.status_code)  # type: ignore[attr-defined]


async def test_the_walker_catches_a_route_built_without_the_rules(world: World) -> None:
    async def peek(request: Request) -> Response:
        job = await queue.get_job(world.db, uuid.UUID(request.path_params["job_id"]))
        return JSONResponse({"status": job.status if job else None})

    async def peek_for_member(request: Request, job: Any) -> Response:
        return JSONResponse({"status": job.status})

    world.app.router.routes.append(Route("/ai/jobs/{job_id}/peek", peek, methods=["GET"]))
    world.app.router.routes.append(Route("/debug/{job_id}", peek, methods=["GET"]))
    world.app.router.routes.append(job_route("/ai/jobs/{job_id}/fine", peek_for_member, methods=["GET"]))
    world.app.router.routes.append(Route("/console/jobs/{job_id}/peek", peek, methods=["GET"]))
    world.app.router.routes.append(console.routes()[-1])  # built by the factory: passes
    wrong = await walk(world)
    assert any(w.startswith("GET /console/jobs/{job_id}/peek with cookie None") for w in wrong), wrong
    assert any(w.startswith("GET /ai/jobs/{job_id}/peek without the secret") for w in wrong), wrong
    assert any(w.startswith("GET /ai/jobs/{job_id}/peek with no user") for w in wrong), wrong
    assert any(w.startswith("GET /debug/{job_id}") for w in wrong), wrong
    assert not any("/fine" in w for w in wrong), wrong


# ---------------------------------------------------------------------------
# the finding, as it was tried


JOB_ROUTES = [("GET", ""), ("GET", "/events"), ("POST", "/cancel")]


@pytest.mark.parametrize(("method", "tail"), JOB_ROUTES, ids=["read", "stream", "cancel"])
@pytest.mark.parametrize(
    ("query", "headers", "status", "needle"),
    [
        ("", [], 400, USER),
        ("user_id=", [], 400, "no query"),
        ("USER_ID={stranger}", [], 400, "no query"),
        ("User_Id={stranger}", [], 400, "no query"),
        ("user_id={member}&user_id={stranger}", [], 400, "no query"),
        ("user_id={stranger}&user_id={member}", [], 400, "no query"),
        ("", [(USER, "")], 422, "invalid header"),
        ("", [(USER, "{member}"), (USER, "{member}")], 400, "2 times"),
        ("", [("x-kyrie-user-id", "{stranger}")], 404, "not found"),
        ("", [(USER, "urn:uuid:{member}")], 422, "invalid header"),
        ("", [(USER, "{member_hex}")], 422, "invalid header"),
    ],
    ids=["missing", "empty-query", "upper-case-query", "mixed-case-query", "query-twice",
         "query-twice-reversed", "empty-header", "header-twice",
         "stranger-lower-case-header", "urn-header", "hex-header"],
)
async def test_job_routes_refuse_a_missing_repeated_or_malformed_user(  # type: ignore[no-untyped-def]
    world: World, method, tail, query, headers, status, needle
) -> None:
    values = {"member": world.member, "stranger": world.stranger, "member_hex": world.member.hex}
    before = await snapshot(world.db)
    sent = [(k, v.format(**values)) for k, v in headers]
    url = f"/ai/jobs/{world.job}{tail}" + ("?" + query.format(**values) if query else "")
    request = world.client.build_request(method, url, headers=[("X-Internal-Secret", SECRET), *sent])
    response = await world.client.send(request)
    assert needle in assert_error_contract(response, status)["message"]
    assert await snapshot(world.db) == before


async def test_whitespace_around_the_header_is_http_s_not_the_value_s(world: World) -> None:
    response = await world.client.get(
        f"/ai/jobs/{world.job}", headers={"X-Internal-Secret": SECRET, USER: f" {world.member}\t"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "crafted",
    ["{job}?x=", "{job}?user_id={member}&x=", "{job}#", "{job}?user_id={member}#", "{job}%3Fx%3D"],
)
@pytest.mark.parametrize("tail", ["", "/events", "/cancel"])
async def test_a_crafted_job_id_through_an_unencoded_proxy_reaches_nothing(
    world: World, crafted: str, tail: str
) -> None:
    """What the README's old proxy did: `${ENGINE}/ai/jobs/${id}<tail>?user_id=${user}`, the id
    unencoded and the user (here a stranger, the attacker) appended.  Now the user goes in a header
    the path cannot touch, and any query string is refused: none of these reads or cancels the job."""
    job_id = crafted.format(job=world.job, member=world.member)
    url = f"/ai/jobs/{job_id}{tail}?user_id={world.stranger}"
    before = await snapshot(world.db)
    method = "POST" if tail == "/cancel" else "GET"
    response = await world.client.request(
        method, url, headers={"X-Internal-Secret": SECRET, USER: str(world.stranger)}
    )
    assert 400 <= response.status_code < 500
    assert_error_contract(response, response.status_code)
    assert str(world.job) not in response.text or "message" in response.json()
    assert await snapshot(world.db) == before
    # Encoded as the README now shows, the crafted id is one (unknown) path segment.
    from urllib.parse import quote

    encoded = await world.client.request(
        method, f"/ai/jobs/{quote(job_id, safe='')}{tail}",
        headers={"X-Internal-Secret": SECRET, USER: str(world.member)},
    )
    assert assert_error_contract(encoded, 404)["message"] == "job not found"
    assert await snapshot(world.db) == before


@pytest.mark.parametrize(
    ("raw", "headers", "status", "needle"),
    [
        ('{{"workspace_id": "{ws}", "user_id": "{stranger}", "user_id": "{member}"}}', [], 400, "user_id"),
        ('{{"workspace_id": "{ws}", "user_id": "{member}", "user_id": "{member}"}}', [], 400, "user_id"),
        ('{{"workspace_id": "{ws}", "user_id": "{member}", "x": 1, "x": 2}}', [], 422, "invalid"),
        ('{{"workspace_id": "{ws}", "user_id": "{stranger}"}}', [(USER, "{member}")], 400, "different"),
        ('{{"workspace_id": "{ws}", "user_id": "{member}"}}', [(USER, "{member}"), (USER, "{member}")], 400,
         "2 times"),
        ('{{"workspace_id": "{ws}", "user_id": "{member}"}}', [(USER, "nope")], 422, "invalid header"),
        ('{{"workspace_id": "{ws}", "user_id": "{stranger}"}}', [], 403, "not a member"),
        ('{{"workspace_id": "{ws}", "USER_ID": "{member}"}}', [], 422, "invalid request body"),
    ],
    ids=["body-user-twice", "body-same-user-twice", "unknown-key-twice", "header-disagrees",
         "header-twice", "header-malformed", "stranger", "upper-case-key"],
)
async def test_analyze_applies_the_same_rule_to_the_body_user(  # type: ignore[no-untyped-def]
    world: World, raw, headers, status, needle
) -> None:
    values = {"ws": world.workspace, "member": world.member, "stranger": world.stranger}
    response = await world.client.post(
        "/ai/cfo/analyze", content=raw.format(**values).encode(),
        headers=[("X-Internal-Secret", SECRET), ("Content-Type", "application/json"),
                 *[(k, v.format(**values)) for k, v in headers]],
    )
    assert needle in assert_error_contract(response, status)["message"]
    assert await world.db.fetchval("select count(*) from public.jobs") == 1  # the fixture's only


async def test_analyze_takes_a_matching_header_and_no_query(world: World) -> None:
    body = {"workspace_id": str(world.workspace), "user_id": str(world.member)}
    ok = await world.client.post(
        "/ai/cfo/analyze", json=body, headers={"X-Internal-Secret": SECRET, USER: str(world.member)}
    )
    assert ok.status_code == 202
    query = await world.client.post(
        f"/ai/cfo/analyze?user_id={world.member}", json=body, headers={"X-Internal-Secret": SECRET}
    )
    assert "no query" in assert_error_contract(query, 400)["message"]
    assert await world.db.fetchval("select count(*) from public.jobs") == 2


# ---------------------------------------------------------------------------
# dates at the edge (issue 11, finding 5)


@pytest.mark.parametrize(
    ("period", "field"),
    [
        ({"period_start": "9999-12-01"}, "period_start"),
        ({"period_end": "9999-12-31"}, "period_end"),
        ({"period_start": "1999-12-31"}, "period_start"),
        ({"period_end": "2101-01-01"}, "period_end"),
        ({"period_start": "0001-01-01", "period_end": "0001-03-31"}, "period_start"),
        ({"period_start": "2000-01-01", "period_end": "2100-12-31"}, "body"),  # span
        ({"period_start": "2026-03-01", "period_end": "2026-02-28"}, "body"),
    ],
)
async def test_dates_out_of_bounds_are_a_422_and_enqueue_nothing(
    world: World, period: dict[str, str], field: str
) -> None:
    body = {"workspace_id": str(world.workspace), "user_id": str(world.member), **period}
    response = await world.client.post("/ai/cfo/analyze", json=body, headers={"X-Internal-Secret": SECRET})
    error = assert_error_contract(response, 422)
    assert field in {e["field"] for e in error["errors"]}
    assert await world.db.fetchval("select count(*) from public.jobs") == 1  # the fixture's only


@pytest.mark.parametrize(
    "period",
    [{"period_start": "2000-01-01"}, {"period_end": "2100-12-31"},
     {"period_start": "2023-01-01", "period_end": "2026-12-31"}],
)
async def test_dates_at_the_bounds_are_accepted(world: World, period: dict[str, str]) -> None:
    body = {"workspace_id": str(world.workspace), "user_id": str(world.member), **period}
    response = await world.client.post("/ai/cfo/analyze", json=body, headers={"X-Internal-Secret": SECRET})
    assert response.status_code == 202, response.text
