"""`kyrie-engine jobs ...` run as a real subprocess against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import pytest

from kyrie_engine import queue

OWNER = "cli-test:1:abcdef"


@dataclass
class Jobs:
    pending: UUID
    running: UUID
    failed: UUID


async def jobs_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kyrie_engine.cli", "jobs", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
async def jobs(db: asyncpg.Connection) -> Jobs:
    pending = (await queue.enqueue(db, "cfo.analyze", {"contract_ids": None})).id
    await queue.enqueue(db, "test.running", {})
    [running] = await queue.claim_jobs(db, OWNER, {"test.running": 1}, 1, 60)
    await queue.set_progress(db, running.id, OWNER, 1, {"step": "reading worklogs", "percent": 40})
    await queue.enqueue(db, "test.failing", {}, max_attempts=1)
    [failed] = await queue.claim_jobs(db, OWNER, {"test.failing": 1}, 1, 60)
    error = "ValueError: the model said 42\n\nTraceback (most recent call last): ..."
    await queue.fail_job(db, failed.id, OWNER, 1, error)
    return Jobs(pending, running.id, failed.id)


async def test_stats_list_and_show_read_well(db_dsn: str, jobs: Jobs) -> None:
    stats = await jobs_cli(db_dsn, "stats")
    assert stats.returncode == 0, stats.stderr
    for text in ("kind", "oldest pending", "cfo.analyze", "test.failing", "running (1)", "reading worklogs",
                 OWNER, "recent failures", "ValueError: the model said 42"):
        assert text in stats.stdout
    assert "Traceback" not in stats.stdout  # first lines only in tables

    listed = await jobs_cli(db_dsn, "list", "--status", "failed")
    assert listed.returncode == 0, listed.stderr
    assert str(jobs.failed) in listed.stdout and str(jobs.pending) not in listed.stdout

    as_json = await jobs_cli(db_dsn, "list", "--json")
    assert {j["id"] for j in json.loads(as_json.stdout)} == {str(j) for j in vars(jobs).values()}

    shown = await jobs_cli(db_dsn, "show", str(jobs.running)[:8])  # a prefix is enough
    assert shown.returncode == 0, shown.stderr
    for text in (str(jobs.running), "running", "1 of 5", OWNER, '"step": "reading worklogs"'):
        assert text in shown.stdout


@pytest.mark.parametrize(
    ("args", "which", "code", "status_after", "says"),
    [
        (["retry"], "failed", 0, "pending", "pending again"),
        (["retry"], "running", 1, "running", "only failed, cancelled or scheduled"),
        (["cancel"], "pending", 0, "cancelled", "cancelled"),
        (["cancel"], "running", 0, "cancelled", "stops the handler"),
        (["cancel"], "failed", 1, "failed", "already failed"),
        (["show"], "missing", 1, None, "no job"),
    ],
)
async def test_retry_and_cancel(
    db_dsn: str, db: asyncpg.Connection, jobs: Jobs, args: list[str], which: str, code: int,
    status_after: str | None, says: str,
) -> None:
    job_id = getattr(jobs, which, None) or UUID(int=1)
    result = await jobs_cli(db_dsn, *args, str(job_id))
    assert result.returncode == code, result.stderr
    assert says in (result.stdout if code == 0 else result.stderr)
    if status_after is not None:
        assert await db.fetchval("select status from public.jobs where id = $1", job_id) == status_after


async def test_a_missing_database_url_is_one_clear_line(db_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kyrie_engine.cli", "jobs", "stats"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_a_job_that_completes_between_read_and_cancel_is_not_reported_cancelled(
    db_dsn: str, db: asyncpg.Connection, jobs: Jobs
) -> None:
    """The CLI reads the job (running), then cancels it; here its worker completes
    it in between: the cancel changes nothing, and the CLI says so and exits 1."""
    worker = await asyncpg.connect(db_dsn)
    try:
        finishing = worker.transaction()
        await finishing.start()
        await worker.execute("select 1 from public.jobs where id = $1 for update", jobs.running)
        cli = asyncio.create_task(jobs_cli(db_dsn, "cancel", str(jobs.running)))
        for _ in range(1200):  # until the CLI has read the job and its cancel waits for our row lock
            if await db.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database()"
                " and wait_event_type = 'Lock'"
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the CLI's cancel never waited for the row")
        assert await queue.complete_job(worker, jobs.running, OWNER, 1, {"ok": True})
        await finishing.commit()
        result = await cli
    finally:
        await worker.close()
    assert result.returncode == 1, result.stdout
    assert f"job {jobs.running} became completed before the cancel: nothing cancelled" in result.stderr
    assert "cancelled (" not in result.stdout
    assert await db.fetchval("select status from public.jobs where id = $1", jobs.running) == "completed"


async def test_a_job_cancelled_by_someone_else_is_not_reported_as_our_cancel(
    db_dsn: str, db: asyncpg.Connection, jobs: Jobs
) -> None:
    await queue.cancel_job(db, jobs.pending, "by the app")
    result = await jobs_cli(db_dsn, "cancel", str(jobs.pending))
    assert result.returncode == 1
    assert "already cancelled: nothing to cancel" in result.stderr
    assert await db.fetchval("select error from public.jobs where id = $1", jobs.pending) == "by the app"
