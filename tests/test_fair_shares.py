"""Fair shares between workspaces in kyrie.claim_jobs: turns within a kind
and a priority, strict priority above them, and per-workspace caps across
workers (kyrie.workspace_kind_limits)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from queue_support import FAST, running, wait_until
from support import new_user, new_workspace

from kyrie_engine import queue
from kyrie_engine.worker import JobContext, Worker

HANDLER_SECONDS = 0.05


async def workspaces(db: asyncpg.Connection, n: int) -> list[uuid.UUID]:
    owner = await new_user(db)
    return [await new_workspace(db, owner, f"ws {i}") for i in range(n)]


async def claim(db: asyncpg.Connection, kind: str, limit: int, owner: str = "w-test") -> list[asyncpg.Record]:
    return await db.fetch(
        "select id, workspace_id from kyrie.claim_jobs($1, $2, $3, $4, 30)", owner, [kind], [limit], limit
    )


async def test_one_batch_takes_turns_across_workspaces(db: asyncpg.Connection) -> None:
    a, b, c = await workspaces(db, 3)
    for ws, n in ((a, 5), (b, 2), (c, 1)):
        await queue.enqueue_many(db, "test.fair", [{"i": i} for i in range(n)], workspace_id=ws)
    await queue.enqueue_many(db, "test.fair", [{}, {}], workspace_id=None)  # system jobs: one group
    order = [r["workspace_id"] for r in await claim(db, "test.fair", 10)]
    assert order == [a, b, c, None, a, b, None, a, a, a]


async def test_running_jobs_count_as_turns_already_taken(db: asyncpg.Connection) -> None:
    a, b = await workspaces(db, 2)
    await queue.enqueue_many(db, "test.fair", [{}] * 10, workspace_id=a)
    assert [r["workspace_id"] for r in await claim(db, "test.fair", 2)] == [a, a]
    await queue.enqueue(db, "test.fair", {}, workspace_id=b)
    # A has two running (on any worker): B's one job goes first, then A again.
    assert [r["workspace_id"] for r in await claim(db, "test.fair", 2, owner="w-other")] == [b, a]


async def test_priority_still_wins_over_turns(db: asyncpg.Connection) -> None:
    a, b = await workspaces(db, 2)
    await queue.enqueue_many(db, "test.fair", [{}] * 4, workspace_id=a)
    await queue.enqueue(db, "test.fair", {}, workspace_id=b)
    await queue.enqueue_many(db, "test.fair", [{}] * 3, workspace_id=a, priority=5)
    rows = await db.fetch(
        "select c.workspace_id, j.priority"
        " from kyrie.claim_jobs('w', '{test.fair}', '{8}', 8, 30) with ordinality c"
        " join public.jobs j using (id) order by c.ordinality"
    )
    assert [(r["workspace_id"], r["priority"]) for r in rows] == [
        (a, 5), (a, 5), (a, 5), (b, 0), (a, 0), (a, 0), (a, 0), (a, 0),
    ]


async def _sleeper(job: JobContext) -> dict[str, Any]:
    await asyncio.sleep(HANDLER_SECONDS)
    return {}


async def test_a_backlog_of_200_delays_another_workspace_by_two_jobs_at_most(
    db: asyncpg.Connection, db_dsn: str,
) -> None:
    a, b = await workspaces(db, 2)
    worker = Worker(db_dsn, {"test.fair": _sleeper}, concurrency=2, run_schedules=False, **FAST)
    async with running(worker):
        await queue.enqueue_many(db, "test.fair", [{"i": i} for i in range(200)], workspace_id=a)
        await wait_until(lambda: db.fetchval(
            "select count(*) >= 6 from public.jobs where status = 'completed'"), within=30)
        b_job = (await queue.enqueue(db, "test.fair", {}, workspace_id=b)).id
        await wait_until(lambda: db.fetchval(
            "select status = 'completed' from public.jobs where id = $1", b_job), within=30)
    row = await db.fetchrow(
        "select b.started_at - b.created_at as waited,"
        "       (select count(*) from public.jobs x where x.workspace_id = $2"
        "          and x.started_at > b.created_at and x.started_at < b.started_at) as a_before"
        " from public.jobs b where b.id = $1", b_job, a,
    )
    # Without turns B would wait for the ~190 jobs ahead of it (~5 s at concurrency 2).
    assert row["a_before"] <= 2, row
    assert row["waited"].total_seconds() < 1.0, row


async def test_two_backlogs_alternate(db: asyncpg.Connection, db_dsn: str) -> None:
    a, b = await workspaces(db, 2)
    await queue.enqueue_many(db, "test.fair", [{"i": i} for i in range(20)], workspace_id=a)
    await queue.enqueue_many(db, "test.fair", [{"i": i} for i in range(20)], workspace_id=b)
    worker = Worker(db_dsn, {"test.fair": _sleeper}, concurrency=2, run_schedules=False, **FAST)
    await asyncio.wait_for(worker.run_until_drained(), 60)
    order = [r["workspace_id"] for r in await db.fetch(
        "select workspace_id from public.jobs order by started_at, id")]
    assert len(order) == 40
    lead = 0
    for ws in order:
        lead += 1 if ws == a else -1
        assert abs(lead) <= 2, order


async def test_per_workspace_caps_hold_across_two_workers(db: asyncpg.Connection, db_dsn: str) -> None:
    a, b = await workspaces(db, 2)
    await db.execute("insert into kyrie.workspace_kind_limits (kind, max_running_per_workspace)"
                     " values ('test.capped', 2)")
    seen: list[int] = []

    async def count_mine(job: JobContext) -> dict[str, Any]:
        async with job.pool.acquire() as conn:
            seen.append(await conn.fetchval(
                "select count(*) from public.jobs where status = 'running' and kind = 'test.capped'"
                " and workspace_id = $1", job.workspace_id))
        await asyncio.sleep(HANDLER_SECONDS)
        return {}

    for ws in (a, b):
        await queue.enqueue_many(db, "test.capped", [{}] * 15, workspace_id=ws)
    workers = [Worker(db_dsn, {"test.capped": count_mine}, concurrency=5, run_schedules=False, **FAST)
               for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(w.run_until_drained() for w in workers)), 60)
    assert await db.fetchval("select count(*) from public.jobs where status = 'completed'") == 30
    assert len(seen) == 30 and max(seen) == 2, seen  # the cap was reached, and never passed
