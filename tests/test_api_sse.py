"""Live job events over a real uvicorn: the stream follows the job and ends with it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from support import new_user, new_workspace
from test_api_support import SECRET, build, served, settings_for, wait_ready

from kyrie_engine import queue
from kyrie_engine.api import build_app
from kyrie_engine.events import APPLICATION_NAME
from kyrie_engine.worker import JobContext, Worker

AUTH = {"X-Internal-Secret": SECRET}


def as_user(user: uuid.UUID) -> dict[str, str]:
    return {**AUTH, "X-Kyrie-User-Id": str(user)}
KIND = "cfo.analyze"


class Stream:
    """The events of one SSE response, parsed as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.comments = 0
        self._lines = response.aiter_lines()

    async def next_job(self, within: float = 30) -> dict[str, Any] | None:
        """The next `job` event's data, or None when the stream ended."""
        return await asyncio.wait_for(self._next(), within)

    async def _next(self) -> dict[str, Any] | None:
        event: dict[str, str] = {}
        async for line in self._lines:
            if line.startswith(":"):
                self.comments += 1
            elif line == "":
                if event.get("event") == "job":
                    return dict(json.loads(event["data"]))
                event = {}
            else:
                name, _, value = line.partition(":")
                event[name] = value.strip()
        return None


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, job_id: uuid.UUID, user: uuid.UUID
) -> AsyncIterator[Stream]:
    async with client.stream("GET", f"/ai/jobs/{job_id}/events", headers=as_user(user)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        yield Stream(response)


async def _workspace(db: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    user = await new_user(db)
    return await new_workspace(db, user), user


async def test_the_stream_follows_a_job_run_by_a_worker_to_its_end(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    workspace, user = await _workspace(db)
    gates = [asyncio.Event() for _ in range(3)]

    async def handler(job: JobContext) -> dict[str, Any]:
        await gates[0].wait()
        await job.progress("reading contracts", 30)
        await gates[1].wait()
        await job.progress("asking the model", 60)
        await gates[2].wait()
        return {"summary": "fine"}

    worker = Worker(db_dsn, {KIND: handler}, concurrency=1, poll_seconds=0.2, handle_signals=False)
    app = build_app(settings_for(db_dsn), worker=worker)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        posted = await client.post(
            "/ai/cfo/analyze", json={"workspace_id": str(workspace), "user_id": str(user)}, headers=AUTH
        )
        job_id = uuid.UUID(posted.json()["job_id"])
        async with open_stream(client, job_id, user) as stream:
            seen = [await stream.next_job()]
            assert seen[0] is not None and seen[0]["status"] == "pending" and seen[0]["id"] == str(job_id)
            await asyncio.sleep(1.5)  # idle: keep-alive comments flow (counted as they are read)
            running = asyncio.create_task(worker.run())
            try:
                for gate in [*gates, None]:
                    event = await stream.next_job()
                    assert event is not None
                    seen.append(event)
                    if gate is not None:
                        ready = (await wait_ready(client)).json()
                        assert ready["checks"]["worker_listener"] is True
                        gate.set()
                assert await stream.next_job() is None  # ended after the terminal status
                assert stream.comments >= 1
            finally:
                worker.stop()
                await asyncio.wait_for(running, 30)
    steps = [(e["status"], (e["progress"] or {}).get("step")) for e in seen]
    assert steps == [
        ("pending", None),
        ("running", None),
        ("running", "reading contracts"),
        ("running", "asking the model"),
        ("completed", "asking the model"),
    ]
    assert seen[-1]["result"] == {"summary": "fine"} and seen[-1]["attempts"] == 1


async def test_a_cancel_ends_the_stream_and_a_finished_job_streams_once(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    workspace, user = await _workspace(db)
    job = await queue.enqueue(db, KIND, {}, workspace_id=workspace)
    done = await queue.enqueue(db, "other.kind", {}, workspace_id=workspace)
    await queue.claim_jobs(db, "w", {"other.kind": 1}, 1, 60)
    await queue.complete_job(db, done.id, "w", 1, {"n": 1})
    async with served(build(db_dsn)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, job.id, user) as stream:
            first = await stream.next_job()
            assert first is not None and first["status"] == "pending"
            assert (await client.post(f"/ai/jobs/{job.id}/cancel", headers=as_user(user))).status_code == 200
            last = await stream.next_job()
            assert last is not None and last["status"] == "cancelled"
            assert await stream.next_job() is None
        async with open_stream(client, done.id, user) as stream:
            only = await stream.next_job()
            assert only is not None and only["status"] == "completed" and only["result"] == {"n": 1}
            assert await stream.next_job() is None


async def test_a_client_that_goes_away_frees_its_follower(db: asyncpg.Connection, db_dsn: str) -> None:
    workspace, user = await _workspace(db)
    job = await queue.enqueue(db, KIND, {}, workspace_id=workspace)
    app = build(db_dsn)
    events = app.state.runtime.events
    async with served(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with open_stream(client, job.id, user) as stream:
                assert await stream.next_job() is not None
                assert events.follower_count == 1
                metrics = (await client.get("/metrics")).text
                assert "kyrie_sse_followers 1.0" in metrics
        for _ in range(300):
            if events.follower_count == 0:
                break
            await asyncio.sleep(0.05)
        assert events.follower_count == 0


async def test_the_stream_survives_the_loss_of_the_listen_connection(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    workspace, user = await _workspace(db)
    job = await queue.enqueue(db, KIND, {}, workspace_id=workspace)
    app = build(db_dsn)
    events = app.state.runtime.events
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, job.id, user) as stream:
            assert await stream.next_job() is not None
            before = events.reconnects
            killed = await db.fetchval(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = $1",
                APPLICATION_NAME,
            )
            assert killed == 1
            for _ in range(600):
                if events.reconnects > before and events.connected:
                    break
                await asyncio.sleep(0.05)
            assert events.connected
            await queue.claim_jobs(db, "w", {KIND: 1}, 1, 60)
            running = await stream.next_job()
            assert running is not None and running["status"] == "running"
            await queue.complete_job(db, job.id, "w", 1, None)
            assert (await stream.next_job() or {}).get("status") == "completed"
            assert await stream.next_job() is None


async def test_without_a_listen_connection_events_are_503_and_readyz_says_disabled(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    """DATABASE_URL marked as a transaction pooler: no LISTEN, so no live events (but ready)."""
    workspace, user = await _workspace(db)
    job = await queue.enqueue(db, KIND, {}, workspace_id=workspace)
    app = build_app(settings_for(db_dsn + "?pgbouncer=true"))
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": True, "listener": "disabled"}
        response = await client.get(f"/ai/jobs/{job.id}/events", headers=as_user(user))
        assert response.status_code == 503
        assert "KYRIE_LISTEN_DATABASE_URL" in response.json()["message"]
