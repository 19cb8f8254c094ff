"""Retention: old finished jobs go, everything else stays, whatever runs it.

Finished jobs are back-dated (finished_at in the past); two runners on two
pools purge at once; a delete trigger in the test database records every
deleted id, so "each old job deleted once" is counted, not inferred.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any

import asyncpg
import pytest
from support import new_user, new_workspace

from kyrie_engine import queue, retention
from kyrie_engine.settings import Settings, SettingsError, load, parse_keep
from kyrie_engine.worker import Worker

DAY = dt.timedelta(days=1)
OWNER = "retention-test:1"


# ---------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    ("text", "period"),
    [("7d", 7 * DAY), ("12h", dt.timedelta(hours=12)), ("30m", dt.timedelta(minutes=30)),
     ("45s", dt.timedelta(seconds=45)), (" 30D ", 30 * DAY), ("0", None)],
)
def test_keep_periods_parse(text: str, period: dt.timedelta | None) -> None:
    assert parse_keep(text) == period


@pytest.mark.parametrize("text", ["7", "7 days", "-1d", "d", "", "0d", "1w", "1.5d", "7d12h"])
def test_a_keep_period_that_is_not_one_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1/db")
    monkeypatch.setenv("KYRIE_KEEP_FAILED", text)
    with pytest.raises(SettingsError, match=r"^KYRIE_KEEP_FAILED: must be a duration like 7d"):
        load(Settings)


def test_retention_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1/db")
    for name in ("KYRIE_KEEP_COMPLETED", "KYRIE_KEEP_FAILED"):
        monkeypatch.delenv(name, raising=False)
    settings = load(Settings)
    assert isinstance(settings, Settings)
    assert (settings.keep_completed, settings.keep_failed) == (7 * DAY, 30 * DAY)
    monkeypatch.setenv("KYRIE_KEEP_COMPLETED", "0")
    settings = load(Settings)
    assert isinstance(settings, Settings) and settings.keep_completed is None


# ---------------------------------------------------------------------------
# the purge


async def _finished(db: asyncpg.Connection, status: str, age: dt.timedelta, n: int,
                    workspace: uuid.UUID | None = None, user: uuid.UUID | None = None) -> list[uuid.UUID]:
    """n jobs of `status`, finished `age` ago."""
    ids = await queue.enqueue_many(db, "test.kind", [{}] * n, workspace_id=workspace, user_id=user)
    await db.execute(
        "update public.jobs set status = $2, finished_at = now() - $3::interval, attempts = 1,"
        " result = case when $2 = 'completed' then '{}'::jsonb end where id = any($1)",
        ids, status, age,
    )
    return ids


@pytest.fixture
async def history(db: asyncpg.Connection) -> dict[str, list[uuid.UUID]]:
    user = await new_user(db)
    workspace = await new_workspace(db, user)
    jobs = {
        "old completed": await _finished(db, "completed", 8 * DAY, 260, workspace, user),
        "old failed": await _finished(db, "failed", 31 * DAY, 40),
        "old cancelled": await _finished(db, "cancelled", 31 * DAY, 30),
        "recent completed": await _finished(db, "completed", 6 * DAY, 20),
        "failed, kept 30 days": await _finished(db, "failed", 8 * DAY, 15),
        "pending": await queue.enqueue_many(db, "test.kind", [{}] * 10),
    }
    # Old but never finished: a job waiting since long ago is work, not history.
    await db.execute("update public.jobs set created_at = now() - interval '90 days', run_at = now()"
                     " - interval '90 days' where id = any($1)", jobs["pending"])
    await queue.enqueue(db, "test.running", {})
    [running] = await queue.claim_jobs(db, OWNER, {"test.running": 1}, 1, 600)
    await db.execute(
        "update public.jobs set started_at = now() - interval '60 days' where id = $1", running.id
    )
    jobs["running"] = [running.id]
    # Actions of old analyses, which must outlive their job rows.
    [with_actions] = jobs["old completed"][:1]
    await db.execute(
        "select kyrie.propose_actions($1, $2::jsonb)", with_actions,
        json.dumps([{"type": "send_invoice", "title": "Invoice Acme", "reason": "unbilled hours"},
                    {"type": "close_contract", "title": "Close Website", "reason": "done"}]),
    )
    await db.execute(
        """
        create table public.deleted_jobs (id uuid not null);
        create function public.log_deleted_job() returns trigger language plpgsql as
        $$ begin insert into public.deleted_jobs values (old.id); return old; end $$;
        create trigger log_deleted_job after delete on public.jobs
          for each row execute function public.log_deleted_job();
        """
    )
    return jobs


OLD = ("old completed", "old failed", "old cancelled")


async def test_two_runners_at_once_delete_each_old_job_once_and_keep_the_rest(
    db: asyncpg.Connection, db_dsn: str, history: dict[str, list[uuid.UUID]]
) -> None:
    pools = [await asyncpg.create_pool(db_dsn, min_size=1, max_size=2) for _ in range(2)]
    try:
        async def runner(pool: asyncpg.Pool) -> int:
            # Each loops until there is nothing left, whether it or the other deleted it.
            total = 0
            while await pool.fetchval(
                "select exists (select from public.jobs where finished_at < now() - interval '7 days'"
                " and status = 'completed' or finished_at < now() - interval '30 days')"
            ):
                total += await retention.purge(pool, 7 * DAY, 30 * DAY, batch=25, pause_seconds=0)
            return total

        counts = await asyncio.gather(*(runner(p) for p in pools))
    finally:
        for p in pools:
            await p.close()

    old = {i for key in OLD for i in history[key]}
    deleted = [r["id"] for r in await db.fetch("select id from public.deleted_jobs")]
    assert len(deleted) == len(set(deleted)) == len(old) == sum(counts)  # each exactly once
    assert set(deleted) == old
    kept = {i for key, ids in history.items() if key not in OLD for i in ids}
    assert {r["id"] for r in await db.fetch("select id from public.jobs")} == kept

    actions = await db.fetch("select job_id, metadata->>'original_job_id' as original from public.ai_actions")
    assert len(actions) == 2
    assert all(a["job_id"] is None and a["original"] == str(history["old completed"][0]) for a in actions)


async def test_a_runner_that_finds_the_lock_taken_stands_aside(
    db: asyncpg.Connection, db_dsn: str, history: dict[str, list[uuid.UUID]]
) -> None:
    holder = await asyncpg.connect(db_dsn)
    try:
        async with holder.transaction():
            assert await retention.purge_once(holder, 7 * DAY, 30 * DAY, batch=10) == 10
            # Its transaction still holds the lock: another runner gets None and deletes nothing.
            assert await retention.purge_once(db, 7 * DAY, 30 * DAY) is None
            assert await retention.purge(db, 7 * DAY, 30 * DAY) == 0
    finally:
        await holder.close()
    assert await retention.purge(db, 7 * DAY, 30 * DAY, batch=50, pause_seconds=0) == 330 - 10


async def test_a_period_of_none_keeps_those_jobs_forever(
    db: asyncpg.Connection, history: dict[str, list[uuid.UUID]]
) -> None:
    assert await retention.purge(db, None, 30 * DAY, pause_seconds=0) == 70  # failed and cancelled only
    assert await retention.purge(db, 7 * DAY, None, pause_seconds=0) == 260
    assert await retention.purge(db, None, None) == 0


async def test_a_job_retried_after_it_was_picked_is_kept(
    db: asyncpg.Connection, db_dsn: str, history: dict[str, list[uuid.UUID]]
) -> None:
    """The DELETE re-checks its conditions after waiting for a row an operator is retrying."""
    failed = history["old failed"][0]
    operator = await asyncpg.connect(db_dsn)
    try:
        retrying = operator.transaction()
        await retrying.start()
        await queue.retry_job(operator, failed)  # holds the row until commit
        purge = asyncio.create_task(retention.purge_once(db, None, 30 * DAY, batch=1000))
        await asyncio.sleep(0.5)
        await retrying.commit()
        assert await purge == 69
    finally:
        await operator.close()
    assert await db.fetchval("select status from public.jobs where id = $1", failed) == "pending"


async def test_run_purges_soon_after_start_then_stops_when_asked(
    db: asyncpg.Connection, pool: asyncpg.Pool, history: dict[str, list[uuid.UUID]]
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        retention.run(pool, 7 * DAY, 30 * DAY, stop, first_delay_seconds=0.1, interval_seconds=0.2, batch=100)
    )
    for _ in range(200):
        if await db.fetchval("select count(*) from public.deleted_jobs") == 330:
            break
        await asyncio.sleep(0.05)
    assert await db.fetchval("select count(*) from public.deleted_jobs") == 330
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_run_survives_the_database_going_away(db_dsn: str) -> None:
    """A purge that fails is logged and retried at the next tick; the task does not die."""
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    assert pool is not None
    stop = asyncio.Event()
    task = asyncio.create_task(
        retention.run(pool, 7 * DAY, 30 * DAY, stop, first_delay_seconds=0, interval_seconds=0.05)
    )
    await pool.execute("drop function kyrie.purge_finished_jobs(interval, interval, int)")
    await asyncio.sleep(0.3)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    await pool.close()


def test_the_defaults_keep_the_promises() -> None:
    assert retention.FIRST_DELAY_SECONDS[1] < 60  # a purge within a minute of start-up
    assert retention.INTERVAL_SECONDS <= 600  # then at least every ten minutes


# ---------------------------------------------------------------------------
# in the Worker: on by default, one more of its side loops


async def _noop(job: Any) -> None:
    return None


def test_a_worker_purges_by_default_and_not_when_told_to_keep_everything(db_dsn: str) -> None:
    assert "retention" in Worker(db_dsn, {"test.kind": _noop}).loops.names
    assert "retention" not in Worker(db_dsn, {"test.kind": _noop}, keep_completed=None,
                                     keep_failed=None).loops.names


async def test_two_workers_running_delete_each_old_job_once_and_keep_the_rest(
    db: asyncpg.Connection, db_dsn: str, history: dict[str, list[uuid.UUID]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Start-up's first purge comes within a minute; the test has no minute to wait.
    monkeypatch.setattr(retention, "FIRST_DELAY_SECONDS", (0.05, 0.2))
    workers = [Worker(db_dsn, {"test.other": _noop}, concurrency=2) for _ in range(2)]
    runs = [asyncio.create_task(w.run()) for w in workers]
    try:
        for _ in range(200):
            if await db.fetchval("select count(*) from public.deleted_jobs") >= 330:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time enough for a second delete of any job to show
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*runs)

    old = {i for key in OLD for i in history[key]}
    deleted = [r["id"] for r in await db.fetch("select id from public.deleted_jobs")]
    assert len(deleted) == len(set(deleted)) == len(old)  # each exactly once
    assert set(deleted) == old
    kept = {i for key, ids in history.items() if key not in OLD for i in ids}
    assert {r["id"] for r in await db.fetch("select id from public.jobs")} == kept
    assert await db.fetchval("select count(*) from public.ai_actions where job_id is null") == 2
