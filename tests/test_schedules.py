"""Schedules: each slot one job across many workers, one catch-up after a
downtime, and the refusals of `add`, with the database's clock moved by the
test (kyrie.clock, read through kyrie.now())."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest
from queue_support import FAST, wait_until

from kyrie_engine import schedules
from kyrie_engine.worker import JobContext, Worker

T0 = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.UTC)
POLL = 0.05  # the scheduler's pass interval in these tests


async def _noop(job: JobContext) -> None:
    return None


async def set_clock(db: asyncpg.Connection, at: dt.datetime) -> None:
    await db.execute(
        "insert into kyrie.clock (frozen_at) values ($1)"
        " on conflict (only_row) do update set frozen_at = excluded.frozen_at", at,
    )


async def slots_of(db: asyncpg.Connection, kind: str) -> list[dt.datetime]:
    return [r["run_at"] for r in await db.fetch(
        "select run_at from public.jobs where kind = $1 order by run_at", kind)]


@contextlib.asynccontextmanager
async def workers(dsn: str, n: int) -> AsyncIterator[list[Worker]]:
    started = [Worker(dsn, {"test.noop": _noop}, schedules_poll_seconds=POLL, keep_completed=None,
                      keep_failed=None, **FAST) for _ in range(n)]
    tasks = [asyncio.create_task(w.run()) for w in started]
    try:
        for w in started:
            assert await w.ready(30)
        yield started
    finally:
        for w in started:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def settle() -> None:
    """Long enough for every worker to have made several passes."""
    await asyncio.sleep(POLL * 10)


async def test_three_workers_enqueue_each_slot_once_and_one_catch_up_after_a_downtime(
    db: asyncpg.Connection, db_dsn: str,
) -> None:
    await set_clock(db, T0)
    await schedules.add(db, "every-minute", "* * * * *", "test.sched", {"n": 1})
    minute = dt.timedelta(minutes=1)
    base = T0.replace(second=0)
    async with workers(db_dsn, 3):
        await settle()
        assert await slots_of(db, "test.sched") == []  # the slot before it was added is not due
        for k in (1, 2, 3):
            await set_clock(db, base + k * minute + dt.timedelta(seconds=k))
            await wait_until(lambda k=k: _count(db, k), within=10, what=f"slot {k}")
            await settle()
            assert await slots_of(db, "test.sched") == [base + i * minute for i in range(1, k + 1)]
    # Down while slots 4, 5 and 6 pass: one run, for slot 6, when they come back.
    await set_clock(db, base + 6 * minute + dt.timedelta(seconds=20))
    async with workers(db_dsn, 3):
        await wait_until(lambda: _count(db, 4), within=10, what="the catch-up run")
        await settle()
    assert await slots_of(db, "test.sched") == [base + i * minute for i in (1, 2, 3, 6)]
    runs = await db.fetch("select slot, job_id from kyrie.schedule_runs order by slot")
    jobs = await db.fetch("select id, run_at, payload::text as p from public.jobs order by run_at")
    assert [(r["slot"], r["job_id"]) for r in runs] == [(j["run_at"], j["id"]) for j in jobs]
    assert {j["p"] for j in jobs} == {'{"n": 1}'}
    status = await db.fetchrow("select * from kyrie.schedule_status where name = 'every-minute'")
    assert status["last_slot"] == base + 6 * minute and status["next_slot"] == base + 7 * minute
    assert status["last_job_id"] == jobs[-1]["id"] and status["enabled"] and status["timezone"] == "UTC"


async def _count(db: asyncpg.Connection, n: int) -> bool:
    return await db.fetchval("select count(*) from public.jobs where kind = 'test.sched'") >= n


async def test_a_disabled_schedule_enqueues_nothing_and_an_unhandled_kind_still_does(
    db: asyncpg.Connection, db_dsn: str,
) -> None:
    await set_clock(db, T0)
    await schedules.add(db, "off", "* * * * *", "test.off", enabled=False)
    # No worker here handles it: it may run on workers elsewhere.
    await schedules.add(db, "elsewhere", "*/2 * * * *", "reports.elsewhere", timezone="Europe/Paris")
    async with workers(db_dsn, 2):
        await set_clock(db, T0 + dt.timedelta(minutes=5))
        await wait_until(lambda: db.fetchval(
            "select count(*) from public.jobs where kind = 'reports.elsewhere'"), within=10)
        await settle()
        assert await slots_of(db, "test.off") == []
        # Switched on from psql at 00:05:30: the slot of 00:05, missed while it
        # was off, is skipped (passes at 00:05:30 find nothing due), and the
        # schedule starts with 00:06.
        await db.execute("update kyrie.schedules set enabled = true where name = 'off'")
        await settle()
        assert await slots_of(db, "test.off") == []
        await set_clock(db, T0 + dt.timedelta(minutes=6))
        await wait_until(lambda: db.fetchval("select count(*) from public.jobs where kind = 'test.off'"),
                         within=10)
    assert await slots_of(db, "reports.elsewhere") == [dt.datetime(2030, 1, 1, 0, m, tzinfo=dt.UTC)
                                                       for m in (4, 6)]
    # Only the slot at 00:06, after it was switched on: neither one per minute it
    # was off nor the latest of them.
    assert await slots_of(db, "test.off") == [dt.datetime(2030, 1, 1, 0, 6, tzinfo=dt.UTC)]
    pending = await db.fetchval("select count(*) from public.jobs where status <> 'pending'")
    assert pending == 0  # slots in the (moved) future: nothing ran early


async def test_a_worker_told_not_to_runs_no_schedules(db: asyncpg.Connection, db_dsn: str) -> None:
    assert "schedules" in Worker(db_dsn, {"test.noop": _noop}).loops.names
    assert "schedules" not in Worker(db_dsn, {"test.noop": _noop}, run_schedules=False).loops.names


async def test_a_slot_is_enqueued_once_by_racing_callers(db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    await set_clock(db, T0 + dt.timedelta(minutes=1))
    added = await schedules.add(db, "race", "* * * * *", "test.race")
    await db.execute("update kyrie.schedules set created_at = $1, enabled_at = $1",
                     T0 - dt.timedelta(hours=1))
    results = await asyncio.gather(*(schedules.tick(pool) for _ in range(20)))
    assert sum(len(r.enqueued) for r in results) == 1
    # A slot at or before the last one is refused outright, and so is one not yet due.
    for slot in (T0.replace(second=0), T0 + dt.timedelta(minutes=2)):
        assert await db.fetchval("select kyrie.enqueue_schedule_slot($1, $2, 'UTC', $3, $3)",
                                 added.id, added.cron, slot) is None
    # An edit between computing a slot and claiming it: the stale call is a no-op.
    await db.execute("update kyrie.schedules set cron = '*/5 * * * *', last_slot = null")
    assert await db.fetchval("select kyrie.enqueue_schedule_slot($1, '* * * * *', 'UTC', $2, $2)",
                             added.id, T0 + dt.timedelta(seconds=30)) is None
    assert await db.fetchval("select count(*) from kyrie.schedule_runs") == 1


async def test_a_pause_skips_its_slots_and_a_downtime_catches_up_once(db: asyncpg.Connection) -> None:
    await set_clock(db, T0)
    await schedules.add(db, "paused", "* * * * *", "test.paused")
    await schedules.add(db, "running", "* * * * *", "test.running")
    await db.execute("update kyrie.schedules set enabled = false where name = 'paused'")
    # No pass for three minutes, then 'paused' is switched on again, once by
    # the CLI's replace (INSERT ... ON CONFLICT DO UPDATE) and once more from psql.
    await set_clock(db, T0 + dt.timedelta(minutes=3))
    resumed = await schedules.add(db, "paused", "* * * * *", "test.paused", replace=True)
    assert resumed.enabled_at == T0 + dt.timedelta(minutes=3)
    # Already on: an update that leaves it on does not move enabled_at.
    await set_clock(db, T0 + dt.timedelta(minutes=3, seconds=10))
    await db.execute("update kyrie.schedules set enabled = true where name = 'paused'")
    enabled_at = await db.fetchval("select enabled_at from kyrie.schedules where name = 'paused'")
    assert enabled_at == resumed.enabled_at
    done = await schedules.tick(db)
    # 'running' was on the whole time: its latest missed slot (00:03) runs once.
    # 'paused' skips the slots of its pause, 00:03 included.
    assert len(done.enqueued) == 1
    assert await slots_of(db, "test.running") == [dt.datetime(2030, 1, 1, 0, 3, tzinfo=dt.UTC)]
    assert await slots_of(db, "test.paused") == []
    # Even a stale caller that computed 00:03 is refused by the database.
    assert await db.fetchval("select kyrie.enqueue_schedule_slot(id, cron, timezone, $1, $1)"
                             " from kyrie.schedules where name = 'paused'",
                             dt.datetime(2030, 1, 1, 0, 3, tzinfo=dt.UTC)) is None
    await set_clock(db, T0 + dt.timedelta(minutes=4))
    assert len((await schedules.tick(db)).enqueued) == 2
    assert await slots_of(db, "test.paused") == [dt.datetime(2030, 1, 1, 0, 4, tzinfo=dt.UTC)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "* * * *"}, "five fields are needed"),
        ({"cron": "0 0 7 * * 1"}, "five fields are needed"),
        ({"cron": "61 * * * *"}, "invalid cron expression '61 .*': Bad minute"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"kind": "SendEmail"}, "invalid job kind 'SendEmail'"),
        ({"kind": "reports daily"}, "invalid job kind"),
        ({"name": "two words"}, "invalid schedule name"),
    ],
)
async def test_add_refuses_what_no_worker_could_run(
    db: asyncpg.Connection, kwargs: dict[str, str], message: str,
) -> None:
    args = {"name": "s", "cron": "0 7 * * 1", "kind": "reports.weekly", **kwargs}
    with pytest.raises(schedules.ScheduleError, match=message):
        await schedules.add(db, args.pop("name"), args.pop("cron"), args.pop("kind"), **args)
    assert await db.fetchval("select count(*) from kyrie.schedules") == 0


@pytest.mark.parametrize(
    "values",
    [
        "('s', '* * * *', 'UTC', 'a.b')",
        "('s', '* * * * *', 'Mars/Olympus', 'a.b')",
        "('s', '* * * * *', 'UTC', 'SendEmail')",
    ],
)
async def test_psql_inserts_meet_the_same_rules(db: asyncpg.Connection, values: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(f"insert into kyrie.schedules (name, cron, timezone, kind) values {values}")


async def test_a_bad_row_from_psql_is_skipped_and_the_others_still_run(db: asyncpg.Connection) -> None:
    await set_clock(db, T0)
    await db.execute("insert into kyrie.schedules (name, cron, kind) values ('bad', '61 * * * *', 'a.b'),"
                     " ('good', '* * * * *', 'a.c')")
    await set_clock(db, T0 + dt.timedelta(minutes=1))
    done = await schedules.tick(db)
    assert len(done.enqueued) == 1
    assert await db.fetchval("select kind from public.jobs") == "a.c"


def test_due_slots_follow_the_zone_across_dst() -> None:
    # 02:30 local does not exist on 2030-03-31 in Paris; 07:00 local is 05:00 UTC in summer.
    now = dt.datetime(2030, 4, 1, 6, 0, tzinfo=dt.UTC)
    slot = schedules.due_slot("0 7 * * *", "Europe/Paris", now, now - dt.timedelta(days=2))
    assert slot == dt.datetime(2030, 4, 1, 5, 0, tzinfo=dt.UTC)
    assert schedules.due_slot("0 7 * * *", "Europe/Paris", now, slot) is None
    assert schedules.next_slot("0 7 * * *", "UTC", now) == dt.datetime(2030, 4, 1, 7, 0, tzinfo=dt.UTC)


async def test_the_command_adds_lists_and_removes(db: asyncpg.Connection, db_dsn: str) -> None:
    env = {**os.environ, "DATABASE_URL": db_dsn}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kyrie_engine.cli", "schedules", *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    added = cli("add", "weekly-cfo", "0 7 * * 1", "cfo.analyze", "--timezone", "Europe/Paris",
                "--payload", '{"period": "week"}')
    assert added.returncode == 0, added.stderr
    assert "weekly-cfo" in added.stdout and "next slot" in added.stdout
    again = cli("add", "weekly-cfo", "0 7 * * 1", "cfo.analyze")
    assert again.returncode == 1 and "exists already" in again.stderr
    for bad, says in ((["x", "* * *", "a.b"], "five fields"), (["x", "* * * * *", "Bad"], "invalid job kind"),
                      (["x", "* * * * *", "a.b", "--timezone", "Nowhere/Land"], "unknown time zone")):
        refused = cli("add", *bad)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr
    listed = cli("list")
    assert listed.returncode == 0 and "weekly-cfo" in listed.stdout and "Europe/Paris" in listed.stdout
    assert await db.fetchval("select payload->>'period' from kyrie.schedules") == "week"
    assert cli("remove", "weekly-cfo").returncode == 0
    gone = cli("remove", "weekly-cfo")
    assert gone.returncode == 1 and "no schedule named 'weekly-cfo'" in gone.stderr
    assert await db.fetchval("select count(*) from kyrie.schedules") == 0
