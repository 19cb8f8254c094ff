"""Nothing hangs, and faults are quiet: silent connections, hung calls at SIGTERM, outages, races."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from typing import Any

import asyncpg
import pytest
from queue_support import FAST, RUNS_DDL, running, spawn_worker, stop_process, wait_until
from tcp_proxy import Proxy

from kyrie_engine import notifier, queue
from kyrie_engine.context import JobContext
from kyrie_engine.worker import Worker


def make_worker(dsn: str, handlers: dict[str, Any], **options: Any) -> Worker:
    return Worker(dsn, handlers, **{**FAST, "handle_signals": False, "pool_size": 4, **options})


async def count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await db.fetchval(sql, *args))


async def uses_the_database(job: JobContext) -> dict[str, Any]:
    async with job.pool.acquire() as conn:
        return {"one": await conn.fetchval("select 1")}


async def test_jobs_resume_after_every_connection_goes_silent(db_dsn: str, db: asyncpg.Connection) -> None:
    """A network cut without RST: the worker's connections stop answering but never close."""
    lease = FAST["lease_seconds"]
    async with Proxy(db_dsn) as proxy:
        worker = make_worker(proxy.dsn, {"test.kind": uses_the_database})
        async with running(worker):
            first = await queue.enqueue_many(db, "test.kind", [{}] * 10)
            await wait_until(lambda: count(db, "select count(*) = 10 from public.jobs"
                                           " where status = 'completed'"), 30, what="the first jobs")
            proxy.freeze()  # what is open now is dead; new connections work (the failover is done)
            frozen_at = time.monotonic()
            later = await queue.enqueue_many(db, "test.kind", [{}] * 50)
            await wait_until(
                lambda: count(db, "select count(*) = 50 from public.jobs"
                              " where id = any($1) and status = 'completed'", later),
                lease + 30, interval=0.2, what="the jobs enqueued after the cut",
            )
            took = time.monotonic() - frozen_at
    print(f"\nsilent connections: 50 jobs done {took:.1f}s after the cut (lease {lease}s)")
    assert len(first) == 10
    assert await count(db, "select max(attempts) from public.jobs") == 1


@pytest.mark.parametrize("kind", ["test.sleep", "test.query"], ids=["handler-asleep", "handler-in-a-query"])
async def test_sigterm_is_honoured_while_database_calls_hang(
    db_dsn: str, db: asyncpg.Connection, kind: str
) -> None:
    await db.execute(RUNS_DDL)
    grace = 2.0
    ids = await queue.enqueue_many(db, kind, [{"seconds": 60}] * 3, max_attempts=3)
    async with Proxy(db_dsn) as proxy:
        proc = spawn_worker(proxy.dsn, "--grace", str(grace), "--lease", "3")
        try:
            await wait_until(lambda: count(db, "select count(*) = 3 from queue_test.runs"), 60,
                             what="the worker to start its jobs")
            proxy.freeze(blackhole=True)  # nothing answers any more, not even new connections
            await asyncio.sleep(1.0)  # every call of the worker is now waiting
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.monotonic() - sent < grace + 20:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            took = time.monotonic() - sent
        finally:
            err = stop_process(proc, signal.SIGKILL, timeout=5)
    print(f"\nSIGTERM with every database call hung ({kind}): exited after {took:.1f}s (grace {grace}s)")
    assert proc.returncode == 0, err
    assert took <= grace + 5, err
    # Nothing lost: the leases expire and another worker finishes the jobs.
    await db.execute("update public.jobs set payload = '{\"seconds\": 0}' where id = any($1)", ids)
    survivor = make_worker(db_dsn, {kind: uses_the_database})
    async with running(survivor):
        await wait_until(lambda: count(db, "select count(*) = 3 from public.jobs where status = 'completed'"),
                         60, what="the survivor to finish the jobs")


async def test_an_outage_is_two_lines_and_handlers_get_live_connections(
    db_dsn: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with Proxy(db_dsn) as proxy:
        worker = make_worker(proxy.dsn, {"test.kind": uses_the_database}, concurrency=4)
        async with running(worker):
            await worker.ready(30)
            await queue.enqueue_many(db, "test.kind", [{}] * 20)
            await wait_until(lambda: count(db, "select count(*) = 20 from public.jobs"
                                           " where status = 'completed'"), 30, what="the jobs before")
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="kyrie_engine"):
                proxy.cut()  # the database is gone, and says so (connections refused)
                await asyncio.sleep(5)
                proxy.restore()
                after = await queue.enqueue_many(db, "test.kind", [{}] * 20)
                await wait_until(
                    lambda: count(db, "select count(*) = 20 from public.jobs where id = any($1)"
                                  " and status = 'completed'", after),
                    30, what="the jobs after the outage",
                )
                await asyncio.sleep(1)  # the last loops to notice are back too
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("kyrie_engine")]
    print("\n5 s outage, the warnings:\n  " + "\n  ".join(r.getMessage() for r in lines))
    assert 2 <= len(lines) <= 6
    assert any("database back after" in r.getMessage() for r in lines)
    # An empty message names its type instead: no bare "()" (asyncpg's own
    # "unexpected connection_lost() call" is a message, not an empty one).
    assert not any(re.search(r"(?<!\w)\(\s*\)", r.getMessage()) for r in lines)
    # The handlers' connections were replaced: no attempt failed on a dead one.
    assert await count(db, "select max(attempts) from public.jobs") == 1


class _Racy(notifier.Notifier):
    """The ping loses asyncpg's race with a dying connection, once."""

    raced = 0

    async def _ping(self, conn: asyncpg.Connection) -> None:
        if not self.raced:
            self.raced += 1
            raise asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation"
                                                         " (2) is in progress")
        await super()._ping(conn)


async def test_the_notifier_survives_internal_client_error(db_dsn: str, db: asyncpg.Connection) -> None:
    events: list[notifier.Event] = []
    racy = _Racy(db_dsn, ping_seconds=0.1, timeout=2)
    racy.subscribe(events.append)
    racy.start()
    try:
        await wait_until(lambda: racy.raced and racy.connections >= 2 and racy.connected, 30,
                         what="the notifier to reconnect")
        await db.execute("select pg_notify('kyrie_jobs', '')")
        await wait_until(lambda: events, 10, what="a notification after the race")
    finally:
        await racy.stop()
    assert events[0] == notifier.NewJobs()
