"""No job is lost: a worker killed mid-job, Postgres restarted, LISTEN cut, a deploy's SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import asyncpg
import pytest
from queue_support import FAST, RUNS_DDL, record_and_sleep, running, spawn_worker, stop_process, wait_until

from kyrie_engine import queue
from kyrie_engine.embedded import EmbeddedPostgres
from kyrie_engine.worker import JobContext, Worker


async def count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await db.fetchval(sql, *args))


def make_worker(dsn: str, handlers: dict[str, Any], **options: Any) -> Worker:
    return Worker(dsn, handlers, **{**FAST, "handle_signals": False, "pool_size": 4, **options})


async def test_a_killed_worker_loses_no_job(db_dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(RUNS_DDL)
    ids = await queue.enqueue_many(db, "test.sleep", [{"seconds": 0.5}] * 24)
    victim = spawn_worker(db_dsn, "--concurrency", "8", "--lease", "2", "--worker-id", "victim")
    try:
        await wait_until(lambda: count(db, "select count(*) >= 8 from queue_test.runs"), 60,
                         what="the victim to start jobs")
        await asyncio.sleep(0.7)  # some have finished, others are mid-run
    finally:
        victim.kill()  # SIGKILL: no cleanup, no hand-back
        victim.wait()
    in_flight = await count(db, "select count(*) from public.jobs where status = 'running'")

    survivor = make_worker(db_dsn, {"test.sleep": record_and_sleep}, concurrency=8)
    async with running(survivor):
        await wait_until(
            lambda: count(db, "select count(*) = 24 from public.jobs where status in ('completed', 'failed')"
                          ),
            60, what="every job to finish",
        )
    runs = {r["job_id"]: r["n"] for r in await db.fetch(
        "select job_id, count(*) as n from queue_test.runs group by job_id")}
    completed = await count(db, "select count(*) from public.jobs where status = 'completed'")
    twice = sum(1 for n in runs.values() if n > 1)
    print(f"\ncrash: {in_flight} job(s) held by the killed worker; {completed}/24 completed; "
          f"{twice} ran twice; {survivor.stats['reclaimed']} reclaimed by the survivor")
    assert completed == 24  # none lost
    assert set(runs) == set(ids)
    assert 0 < in_flight
    assert twice <= in_flight  # only what was in flight at the kill ran again
    assert max(runs.values()) <= 2


async def test_the_worker_rides_out_a_postgres_restart(own_server: EmbeddedPostgres) -> None:
    dsn = own_server.dsn_for("kyrie")
    done: set[Any] = set()

    async def short(job: JobContext) -> None:
        await asyncio.sleep(0.05)
        done.add(job.id)

    db = await asyncpg.connect(dsn)
    before = await queue.enqueue_many(db, "test.kind", [{}] * 60)
    await db.close()
    worker = make_worker(dsn, {"test.kind": short}, concurrency=4, lease_seconds=10.0, heartbeat_seconds=1.0)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: len(done) >= 10, 60, what="some jobs to run")
        await asyncio.to_thread(own_server.restart)  # fast shutdown: every connection is cut
        db = await asyncpg.connect(dsn)
        try:
            after = await queue.enqueue_many(db, "test.kind", [{}] * 10)
            await wait_until(
                lambda: count(db, "select count(*) = 70 from public.jobs where status = 'completed'"),
                90, what="every job to complete after the restart",
            )
            assert set(before + after) <= done
        finally:
            await db.close()
        assert worker.notifier is not None and worker.notifier.connections >= 2
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def test_jobs_still_start_after_the_listen_connection_is_killed(
    db_dsn: str, db: asyncpg.Connection
) -> None:
    async def returns(job: JobContext) -> dict[str, Any]:
        return {}

    # A poll so slow that only notifications can explain a quick start.
    worker = make_worker(db_dsn, {"test.kind": returns}, poll_seconds=30.0)
    name = "kyrie-listen"
    listener_pid = "select pid from pg_stat_activity where application_name = $1"
    async with running(worker):
        await wait_until(lambda: worker.listener_connected, 30)
        old_pid = await db.fetchval(listener_pid, name)
        assert await db.fetchval("select pg_terminate_backend($1)", old_pid)
        cut = time.monotonic()
        first = await queue.enqueue(db, "test.kind", {})  # while nobody listens
        await wait_until(lambda: count(db, "select count(*) from public.jobs where id = $1 and status = "
                                       "'completed'", first.id), 20, what="the job enqueued during the cut")
        print(f"\nLISTEN cut: job enqueued meanwhile finished {time.monotonic() - cut:.2f}s later")
        new_pid = await wait_until(lambda: db.fetchval(listener_pid, name), 20)
        assert new_pid != old_pid
        second = await queue.enqueue(db, "test.kind", {})  # heard again through the new LISTEN
        await wait_until(lambda: count(db, "select count(*) from public.jobs where id = $1 and status = "
                                       "'completed'", second.id), 20, what="the job enqueued after")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_the_worker_and_hands_back_its_jobs(
    db_dsn: str, db: asyncpg.Connection, sig: signal.Signals
) -> None:
    await db.execute(RUNS_DDL)
    quick = await queue.enqueue(db, "test.sleep", {"seconds": 0.2}, max_attempts=1)
    slow = await queue.enqueue_many(db, "test.sleep", [{"seconds": 60}] * 3, max_attempts=1)
    proc = spawn_worker(db_dsn, "--grace", "2")
    try:
        await wait_until(lambda: count(db, "select count(*) = 4 from queue_test.runs"), 60,
                         what="the worker to start all four jobs")
    finally:
        err = stop_process(proc, sig)
    assert proc.returncode == 0, err
    job = await queue.get_job(db, quick.id)
    assert job is not None and job.status == "completed"  # finished within the grace period
    rows = await db.fetch("select status, attempts, lease_owner from public.jobs where id = any($1)", slow)
    assert [tuple(r) for r in rows] == [("pending", 0, None)] * 3  # handed back, no attempt burned
