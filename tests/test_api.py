"""The HTTP API through the real ASGI app and a real database: every route, every error."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from support import add_member, new_user, new_workspace
from test_api_support import MAX_BODY, SECRET, asgi_client, build, settings_for, wait_ready

from kyrie_engine import queue
from kyrie_engine.api import build_app
from kyrie_engine.embedded import EmbeddedPostgres

AUTH = {"X-Internal-Secret": SECRET}


@dataclass
class World:
    client: httpx.AsyncClient
    db: asyncpg.Connection
    workspace: uuid.UUID
    owner: uuid.UUID
    member: uuid.UUID
    stranger: uuid.UUID

    def analyze_body(self, **changes: Any) -> dict[str, Any]:
        return {"workspace_id": str(self.workspace), "user_id": str(self.member), **changes}

    def as_member(self) -> dict[str, str]:
        return {**AUTH, "X-Kyrie-User-Id": str(self.member)}


@pytest.fixture
async def world(db: asyncpg.Connection, db_dsn: str) -> AsyncIterator[World]:
    owner, member, stranger = [await new_user(db) for _ in range(3)]
    workspace = await new_workspace(db, owner)
    await add_member(db, workspace, member, "member")
    await new_workspace(db, stranger, "Elsewhere")
    async with asgi_client(build(db_dsn)) as client:
        yield World(client, db, workspace, owner, member, stranger)


def assert_error_contract(response: httpx.Response, status: int) -> dict[str, Any]:
    """JSON `{"message", "request_id"}`, the id echoed in X-Request-Id, nothing secret."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["message"], str) and body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert set(body) <= {"message", "request_id", "errors", "checks"}
    assert SECRET not in response.text and "Traceback" not in response.text
    return dict(body)


# ---------------------------------------------------------------------------
# POST /ai/cfo/analyze


async def test_analyze_enqueues_the_job_for_the_member(world: World) -> None:
    contract = uuid.uuid4()
    body = world.analyze_body(
        contract_ids=[str(contract)], period_start="2026-01-01", period_end="2026-03-31"
    )
    response = await world.client.post("/ai/cfo/analyze", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job_id = uuid.UUID(response.json()["job_id"])
    assert response.headers["location"] == f"/ai/jobs/{job_id}"
    job = await queue.get_job(world.db, job_id)
    assert job is not None
    assert (job.kind, job.status, job.workspace_id, job.user_id) == (
        "cfo.analyze", "pending", world.workspace, world.member
    )
    assert job.payload == {
        "contract_ids": [str(contract)], "period_start": "2026-01-01", "period_end": "2026-03-31"
    }


async def test_the_optional_fields_default_to_null(world: World) -> None:
    response = await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers=AUTH)
    assert response.status_code == 202
    job = await queue.get_job(world.db, uuid.UUID(response.json()["job_id"]))
    assert job is not None
    assert job.payload == {"contract_ids": None, "period_start": None, "period_end": None}


async def test_an_idempotency_key_returns_the_same_job(world: World) -> None:
    async def post(key: str) -> httpx.Response:
        return await world.client.post(
            "/ai/cfo/analyze", json=world.analyze_body(), headers={**AUTH, "Idempotency-Key": key}
        )

    first, again, other = await post("click-1"), await post("click-1"), await post("click-2")
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json() == again.json() != other.json()
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert await world.db.fetchval("select count(*) from public.jobs") == 2


WRONG_SECRETS = [
    pytest.param({}, "missing", id="missing"),
    pytest.param({"X-Internal-Secret": ""}, "wrong", id="empty"),
    pytest.param({"X-Internal-Secret": SECRET[:-1] + "x"}, "wrong", id="right-length"),
    pytest.param({"X-Internal-Secret": SECRET[:10]}, "wrong", id="shorter"),
    pytest.param({"X-Internal-Secret": SECRET + "x"}, "wrong", id="longer"),
    pytest.param({"X-Internal-Secret": SECRET.upper()}, "wrong", id="case"),
]


@pytest.mark.parametrize(("headers", "word"), WRONG_SECRETS)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/ai/cfo/analyze"), ("GET", "/ai/jobs/{job}"), ("GET", "/ai/jobs/{job}/events"),
     ("POST", "/ai/jobs/{job}/cancel")],
)
async def test_every_ai_route_needs_the_secret(world: World, headers, word, method, path) -> None:  # type: ignore[no-untyped-def]
    job = (await queue.enqueue(world.db, "cfo.analyze", {}, workspace_id=world.workspace)).id
    response = await world.client.request(
        method, path.format(job=job), headers=headers, json=world.analyze_body()
    )
    body = assert_error_contract(response, 401)
    assert word in body["message"]


RAW = "application/json"


@pytest.mark.parametrize(
    ("content_type", "content", "status", "needle"),
    [
        (None, b'{"a": 1}', 415, "JSON"),
        ("text/plain", b"{}", 415, "JSON"),
        ("application/x-www-form-urlencoded", b"a=1", 415, "JSON"),
        (RAW, b"{not json", 400, "malformed JSON"),
        (RAW, b"", 400, "malformed JSON"),
        (RAW, b"\xff\xfe\x00", 400, "malformed JSON"),
        (RAW, b"[" * 3000, 400, "malformed JSON"),
        (RAW, b'{"workspace_id": "x",}', 400, "malformed JSON"),
        (RAW, b"[]", 422, "invalid request body"),
        (RAW, b'"text"', 422, "invalid request body"),
        (RAW, b"{}", 422, "invalid request body"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_refused(  # type: ignore[no-untyped-def]
    world: World, content_type, content, status, needle
) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    response = await world.client.post("/ai/cfo/analyze", content=content, headers=headers)
    assert needle in assert_error_contract(response, status)["message"]


async def test_json_with_a_charset_or_a_json_suffix_is_accepted(world: World) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.kyrie+json"):
        response = await world.client.post(
            "/ai/cfo/analyze", content=json.dumps(world.analyze_body()).encode(),
            headers={**AUTH, "Content-Type": content_type},
        )
        assert response.status_code == 202, content_type


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"workspace_id": None}, {"workspace_id"}),
        ({"workspace_id": "not-a-uuid"}, {"workspace_id"}),
        ({"workspace_id": 12}, {"workspace_id"}),
        ({"user_id": "drop"}, {"user_id"}),
        ({"contract_ids": ["nope", str(uuid.uuid4())]}, {"contract_ids.0"}),
        ({"contract_ids": []}, {"contract_ids"}),
        ({"contract_ids": "abc"}, {"contract_ids"}),
        ({"contract_ids": [str(uuid.uuid4())] * 501}, {"contract_ids"}),
        ({"period_start": "2026-13-01"}, {"period_start"}),
        ({"period_start": 20260101}, {"period_start"}),
        ({"period_start": "2026-03-01", "period_end": "2026-02-01"}, {"body"}),
        ({"surprise": True}, {"surprise"}),
    ],
)
async def test_validation_errors_name_their_fields(world: World, changes, fields) -> None:  # type: ignore[no-untyped-def]
    body = world.analyze_body(**changes)
    if body.get("user_id") == "drop":
        del body["user_id"]
    response = await world.client.post("/ai/cfo/analyze", json=body, headers=AUTH)
    error = assert_error_contract(response, 422)
    assert error["message"] == "invalid request body"
    assert {e["field"] for e in error["errors"]} == fields
    assert all(isinstance(e["message"], str) and e["message"] for e in error["errors"])
    assert "not-a-uuid" not in response.text  # the input is never echoed


@pytest.mark.parametrize("key", ["", "has space", "é", "k" * 201])
async def test_a_malformed_idempotency_key_is_a_validation_error(world: World, key: str) -> None:
    response = await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(),
        headers={**AUTH, "Idempotency-Key": key.encode()},  # type: ignore[dict-item]
    )
    error = assert_error_contract(response, 422)
    assert error["errors"][0]["field"] == "header.Idempotency-Key"


async def test_a_body_over_the_limit_is_refused_by_its_declared_length(world: World) -> None:
    body = json.dumps(world.analyze_body(padding="x" * MAX_BODY)).encode()
    response = await world.client.post(
        "/ai/cfo/analyze", content=body, headers={**AUTH, "Content-Type": RAW}
    )
    assert_error_contract(response, 413)


async def test_a_body_over_the_limit_is_refused_while_streaming(world: World) -> None:
    """No Content-Length (chunked): the limit is enforced on the bytes actually read."""
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"workspace_id": "'
        for _ in range(1000):
            sent += 1024
            yield b"x" * 1024

    response = await world.client.post(
        "/ai/cfo/analyze", content=chunks(), headers={**AUTH, "Content-Type": RAW}
    )
    assert "content-length" not in response.request.headers
    assert_error_contract(response, 413)
    assert sent < 100 * 1024  # it stopped reading early


async def test_an_unknown_workspace_is_404_and_a_stranger_403(world: World) -> None:
    unknown = await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(workspace_id=str(uuid.uuid4())), headers=AUTH
    )
    assert "workspace" in assert_error_contract(unknown, 404)["message"]
    stranger = await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(user_id=str(world.stranger)), headers=AUTH
    )
    assert "not a member" in assert_error_contract(stranger, 403)["message"]
    nobody = await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(user_id=str(uuid.uuid4())), headers=AUTH
    )
    assert_error_contract(nobody, 403)
    assert await world.db.fetchval("select count(*) from public.jobs") == 0


# ---------------------------------------------------------------------------
# routing errors


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/ai/cfo/analyze", 405, "POST"),
        ("PUT", "/ai/cfo/analyze", 405, "POST"),
        ("DELETE", "/ai/jobs/{job}", 405, "GET"),
        ("GET", "/ai/jobs/{job}/cancel", 405, "POST"),
        ("POST", "/healthz", 405, "GET"),
        ("GET", "/nowhere", 404, None),
        ("GET", "/ai/jobs", 404, None),
        ("GET", "/ai/jobs/not-a-uuid", 404, None),
        ("GET", "/ai/jobs/{unknown}", 404, None),
        ("POST", "/ai/jobs/{unknown}/cancel", 404, None),
        ("GET", "/ai/jobs/{unknown}/events", 404, None),
    ],
)
async def test_routing_errors_are_json(world: World, method, path, status, allow) -> None:  # type: ignore[no-untyped-def]
    job = (await queue.enqueue(world.db, "cfo.analyze", {}, workspace_id=world.workspace)).id
    url = path.format(job=job, unknown=uuid.uuid4())
    response = await world.client.request(method, url, headers=world.as_member())
    assert_error_contract(response, status)
    if allow:
        assert allow in response.headers["allow"]


# ---------------------------------------------------------------------------
# jobs


async def test_a_job_reads_back_with_its_state(world: World) -> None:
    job_id = (await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers=AUTH)).json()[
        "job_id"
    ]
    response = await world.client.get(f"/ai/jobs/{job_id}", headers=world.as_member())
    assert response.status_code == 200
    job = response.json()
    assert job["id"] == job_id and job["status"] == "pending" and job["kind"] == "cfo.analyze"
    assert job["attempts"] == 0 and job["max_attempts"] >= 1
    assert {"progress", "result", "error", "usage", "created_at", "updated_at", "started_at",
            "finished_at", "run_at"} <= set(job)
    assert "lease_owner" not in job and "payload" not in job


async def test_the_user_header_limits_a_job_to_the_members_of_its_workspace(world: World) -> None:
    job_id = (await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers=AUTH)).json()[
        "job_id"
    ]
    for user, status in ((world.member, 200), (world.owner, 200), (world.stranger, 404)):
        for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
            if status == 200 and path:
                continue  # the stream and the cancel are tried by the stranger only
            response = await world.client.request(
                method, f"/ai/jobs/{job_id}{path}", headers={**AUTH, "X-Kyrie-User-Id": str(user)}
            )
            assert response.status_code == status, (user, path)
    bad = await world.client.get(f"/ai/jobs/{job_id}", headers={**AUTH, "X-Kyrie-User-Id": "me"})
    assert assert_error_contract(bad, 422)["errors"][0]["field"] == "header.X-Kyrie-User-Id"
    job = await queue.get_job(world.db, uuid.UUID(job_id))
    assert job is not None and job.status == "pending"  # the stranger's cancel changed nothing


async def test_cancel_a_pending_job_then_again_and_a_finished_one_is_409(world: World) -> None:
    job_id = (await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers=AUTH)).json()[
        "job_id"
    ]
    first = await world.client.post(f"/ai/jobs/{job_id}/cancel", headers=world.as_member())
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = await world.client.post(f"/ai/jobs/{job_id}/cancel", headers=world.as_member())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    done = await queue.enqueue(world.db, "cfo.analyze", {}, workspace_id=world.workspace)
    claimed = await queue.claim_jobs(world.db, "test-worker", {"cfo.analyze": 1}, 1, 60)
    assert [c.id for c in claimed] == [done.id]
    assert await queue.complete_job(world.db, done.id, "test-worker", 1, {"ok": True})
    finished = await world.client.post(f"/ai/jobs/{done.id}/cancel", headers=world.as_member())
    assert "completed" in assert_error_contract(finished, 409)["message"]
    job = await queue.get_job(world.db, done.id)
    assert job is not None and job.status == "completed"


# ---------------------------------------------------------------------------
# probes, metrics, document


async def test_health_and_readiness(world: World) -> None:
    health = await world.client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await wait_ready(world.client)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": True, "listener": True}}


async def test_metrics_count_requests_and_read_jobs_from_the_database(world: World) -> None:
    await wait_ready(world.client)
    await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers=AUTH)
    await world.client.post("/ai/cfo/analyze", json=world.analyze_body(), headers={})
    await world.client.get(f"/ai/jobs/{uuid.uuid4()}", headers=world.as_member())
    response = await world.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'kyrie_http_requests_total{method="POST",route="/ai/cfo/analyze",status="202"} 1.0',
        'kyrie_http_requests_total{method="POST",route="/ai/cfo/analyze",status="401"} 1.0',
        'kyrie_http_requests_total{method="GET",route="/ai/jobs/{job_id}",status="404"} 1.0',
        'kyrie_jobs{kind="cfo.analyze",status="pending"} 1.0',
        'kyrie_jobs{kind="cfo.analyze",status="completed"} 0.0',
        'kyrie_queue_depth{kind="cfo.analyze"} 1.0',
        "kyrie_database_up 1.0",
        "kyrie_events_listener_up 1.0",
        "kyrie_sse_followers 0.0",
    ):
        assert line in text, line
    assert "kyrie_http_request_duration_seconds_bucket" in text
    assert 'route="unmatched"' not in text or "/nowhere" not in text


async def test_job_durations_are_quantiles_over_recent_jobs(world: World) -> None:
    for seconds in (1, 2, 3):
        job = await queue.enqueue(world.db, "cfo.analyze", {}, workspace_id=world.workspace)
        await queue.claim_jobs(world.db, "w", {"cfo.analyze": 1}, 1, 60)
        await queue.complete_job(world.db, job.id, "w", 1, None)
        await world.db.execute(
            "update public.jobs set started_at = finished_at - make_interval(secs => $2) where id = $1",
            job.id, seconds,
        )
    text = (await world.client.get("/metrics")).text
    assert 'kyrie_job_duration_seconds{kind="cfo.analyze",quantile="0.5"} 2.0' in text
    assert 'kyrie_job_duration_window_jobs{kind="cfo.analyze"} 3.0' in text


async def test_the_openapi_document_describes_every_route(world: World) -> None:
    response = await world.client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    app_routes = {(route.path, method.lower())  # type: ignore[attr-defined]
                  for route in build(world_dsn_placeholder()).routes
                  for method in route.methods - {"HEAD"}}  # type: ignore[attr-defined]
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert app_routes == documented
    analyze = doc["paths"]["/ai/cfo/analyze"]["post"]
    assert set(analyze["responses"]) >= {"202", "400", "401", "403", "404", "405", "413", "415", "422",
                                         "500", "503"}
    assert doc["components"]["schemas"]["AnalyzeRequest"]["additionalProperties"] is False


def world_dsn_placeholder() -> str:
    return "postgresql://nobody@127.0.0.1:1/none"  # building an app does not connect


# ---------------------------------------------------------------------------
# request ids, logs, 500 and 503


async def test_a_request_id_is_kept_when_sane_and_made_otherwise(world: World) -> None:
    kept = await world.client.get("/healthz", headers={"X-Request-Id": "next-req-12345678"})
    assert kept.headers["x-request-id"] == "next-req-12345678"
    replaced = await world.client.get("/healthz", headers={"X-Request-Id": "bad id\nwith newline"[:8]})
    assert replaced.headers["x-request-id"] != "bad id\nw"
    assert len(replaced.headers["x-request-id"]) == 32


async def test_log_lines_carry_the_request_id_and_never_the_secret(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(),
        headers={**AUTH, "X-Request-Id": "trace-me-0001"},
    )
    await world.client.post(
        "/ai/cfo/analyze", json=world.analyze_body(),
        headers={"X-Internal-Secret": SECRET[:-1] + "!", "X-Request-Id": "trace-me-0002"},
    )
    from kyrie_engine.logs import JsonLines

    formatter = JsonLines([SECRET])
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    access = [line for line in lines if line["msg"] == "request"]
    assert [(a["request_id"], a["status"], a["route"]) for a in access] == [
        ("trace-me-0001", 202, "/ai/cfo/analyze"), ("trace-me-0002", 401, "/ai/cfo/analyze")
    ]
    everything = caplog.text + "".join(json.dumps(line) for line in lines)
    assert SECRET not in everything and SECRET[:-1] not in everything


def test_the_formatter_masks_secrets_even_if_a_bug_logs_one() -> None:
    from kyrie_engine.logs import JsonLines

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "oops %s", (SECRET,), None)
    line = json.loads(JsonLines([SECRET]).format(record))
    assert line["msg"] == "oops [redacted]"


async def test_an_unexpected_error_is_a_bare_500_with_the_request_id(
    db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    assert pool is not None
    await pool.close()  # a closed pool raises InterfaceError: a bug, not an outage
    app = build_app(settings_for(db_dsn), pool=pool)
    caplog.set_level(logging.INFO)
    async with asgi_client(app) as client:
        response = await client.get(
            f"/ai/jobs/{uuid.uuid4()}", headers={**AUTH, "X-Kyrie-User-Id": str(uuid.uuid4())}
        )
    body = assert_error_contract(response, 500)
    assert body == {"message": "internal error", "request_id": response.headers["x-request-id"]}
    errors = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert len(errors) == 1
    assert errors[0].error_type.endswith("InterfaceError")  # type: ignore[attr-defined]
    assert errors[0].exc_info is None  # a type and a place, no trace


async def test_with_the_database_down_routes_answer_503_and_readyz_says_why(
    own_server: EmbeddedPostgres,
) -> None:
    dsn = own_server.dsn_for("kyrie")
    async with asgi_client(build(dsn, db_timeout_seconds=2)) as client:
        assert (await wait_ready(client)).status_code == 200
        own_server.stop()
        body = assert_error_contract(
            await client.get(
                f"/ai/jobs/{uuid.uuid4()}", headers={**AUTH, "X-Kyrie-User-Id": str(uuid.uuid4())}
            ),
            503,
        )
        assert "database" in body["message"]
        analyze = await client.post(
            "/ai/cfo/analyze", headers=AUTH,
            json={"workspace_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4())},
        )
        assert_error_contract(analyze, 503)
        not_ready = assert_error_contract(await client.get("/readyz"), 503)
        assert not_ready["checks"]["database"] is False
        assert (await client.get("/healthz")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "kyrie_database_up 0.0" in metrics.text
        own_server.start()
        # The listener reconnects with backoff; the pool replaces its dead connections.
        assert (await wait_ready(client)).status_code == 200


@pytest.mark.parametrize(
    "secret",
    ['quote"in-the-middle-of-a-long-secret-value', "back\\slash-in-the-middle-of-a-long-secret",
     'both\\"-and-\\\\-and-"-in-a-long-secret-value', "unicode-é-and-\u2028-line-separator-in-a-secret"],
    ids=["quote", "backslash", "both", "unicode"],
)
def test_secrets_with_json_escapes_are_masked_before_encoding(secret: str) -> None:
    from kyrie_engine.logs import JsonLines

    formatter = JsonLines([secret])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "leaked %s here", (secret,), None)
    record.detail = {"nested": [f"also {secret}"], "n": 1}  # an `extra=` field, structured
    record.other = Exception(f"boom {secret}")  # anything json.dumps would str()
    line = formatter.format(record)
    decoded = json.loads(line)
    assert decoded["msg"] == "leaked [redacted] here"
    assert decoded["detail"] == {"nested": ["also [redacted]"], "n": 1}
    assert decoded["other"] == "boom [redacted]"
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    assert secret not in line and escaped not in line and secret not in decoded.values()
