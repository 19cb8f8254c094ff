"""The worker in this process: handler outcomes, timeouts, cancels, limits, schedules, stops."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest
from queue_support import FAST, running, wait_until
from support import new_user, new_workspace

from kyrie_engine import queue
from kyrie_engine.db import acting_as
from kyrie_engine.events import JobEvents
from kyrie_engine.worker import JobContext, PermanentFailure, RetryLater, Worker

TERMINAL = ("completed", "failed", "cancelled")


def make_worker(dsn: str, handlers: dict[str, Any], **options: Any) -> Worker:
    settings = {**FAST, "handle_signals": False, "pool_size": 4, **options}
    return Worker(dsn, handlers, **settings)


async def finished(db: asyncpg.Connection, job_id: Any, within: float = 30) -> queue.Job:
    async def done() -> queue.Job | None:
        job = await queue.get_job(db, job_id)
        return job if job is not None and job.status in TERMINAL else None

    return await wait_until(done, within, what=f"job {job_id} to finish")


# ---------------------------------------------------------------------------
# what a handler does, and what becomes of its job

calls: Counter[str] = Counter()


async def returns(job: JobContext) -> dict[str, Any]:
    return {"echo": job.payload, "attempt": job.attempt}


async def raises(job: JobContext) -> None:
    raise ValueError("boom")


async def fails_once(job: JobContext) -> dict[str, Any]:
    if job.attempt == 1:
        raise ConnectionError("flaky upstream")
    return {"attempt": job.attempt}


async def permanent(job: JobContext) -> None:
    raise PermanentFailure("contract_ids must not be empty")


async def retry_later_once(job: JobContext) -> dict[str, Any]:
    calls[f"later {job.id}"] += 1
    if calls[f"later {job.id}"] == 1:
        raise RetryLater(0.05, "429 from the model")
    return {"attempt": job.attempt}


async def hangs(job: JobContext) -> None:
    await asyncio.sleep(60)


def blocking(job: JobContext) -> dict[str, Any]:
    time.sleep(0.05)  # a plain function: runs in a thread, off the event loop
    return {"off_loop": threading.current_thread() is not threading.main_thread()}


async def completes_in_own_transaction(job: JobContext) -> dict[str, Any]:
    async with job.pool.acquire() as conn, conn.transaction():
        await conn.execute("insert into queue_test.marks (job_id) values ($1)", job.id)
        await job.complete(conn, {"atomic": True})
    return {"ignored": True}  # the job is completed already; this return value is not written


async def reports_progress(job: JobContext) -> dict[str, Any]:
    await job.progress("reading worklogs", 50)
    return {"done": True}


async def returns_a_nul(job: JobContext) -> dict[str, Any]:
    return {"text": "a\x00b"}  # valid JSON, but jsonb refuses \u0000: the flush must not wedge


async def returns_unencodable(job: JobContext) -> object:
    return object()


async def raises_a_stray_cancel(job: JobContext) -> None:
    raise asyncio.CancelledError  # not cancelled by the worker: a library's inner future


async def advises_forever(job: JobContext) -> None:
    raise RetryLater(float("inf"), "a proxy sent retry-after: inf")


CASES = [
    # handler, max_attempts, status, attempts, result, error contains
    (returns, 3, "completed", 1, {"echo": {"n": 1}, "attempt": 1}, None),
    (raises, 2, "failed", 2, None, "ValueError: boom"),
    (fails_once, 3, "completed", 2, {"attempt": 2}, None),
    (permanent, 5, "failed", 1, None, "PermanentFailure: contract_ids must not be empty"),
    (retry_later_once, 1, "completed", 1, {"attempt": 1}, None),  # RetryLater burns no attempt
    (hangs, 1, "failed", 1, None, "ran past its 0.3s timeout"),
    (blocking, 1, "completed", 1, {"off_loop": True}, None),
    (completes_in_own_transaction, 1, "completed", 1, {"atomic": True}, None),
    (reports_progress, 1, "completed", 1, {"done": True}, None),
    (returns_a_nul, 3, "failed", 1, None, "the job's outcome could not be recorded (complete)"),
    (returns_unencodable, 1, "failed", 1, None, "PydanticSerializationError"),
    (raises_a_stray_cancel, 2, "failed", 2, None, "CancelledError"),
]


@pytest.mark.parametrize(("handler", "max_attempts", "status", "attempts", "result", "error"), CASES,
                         ids=[c[0].__name__ for c in CASES])
async def test_handler_outcomes(
    db_dsn: str, db: asyncpg.Connection, handler: Any, max_attempts: int, status: str, attempts: int,
    result: Any, error: str | None,
) -> None:
    await db.execute("create schema queue_test; create table queue_test.marks (job_id uuid)")
    enq = await queue.enqueue(db, "test.kind", {"n": 1}, max_attempts=max_attempts)
    worker = make_worker(db_dsn, {"test.kind": handler}, timeouts={"test.kind": 0.3})
    async with running(worker):
        job = await finished(db, enq.id)
    assert (job.status, job.attempts, job.result) == (status, attempts, result)
    if error is None:
        assert job.error is None
    else:
        assert job.error is not None and error in job.error
    if handler is completes_in_own_transaction:
        assert await db.fetchval("select count(*) from queue_test.marks where job_id = $1", enq.id) == 1
    if handler is reports_progress:
        assert job.progress == {"step": "reading worklogs", "percent": 50}


async def test_an_endless_retry_after_is_bounded(db_dsn: str, db: asyncpg.Connection) -> None:
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=1)
    worker = make_worker(db_dsn, {"test.kind": advises_forever}, retry_cap_seconds=120)
    async with running(worker):
        for _ in range(200):
            row = await db.fetchrow(
                "select status, attempts, deferrals, run_at - now() as wait from public.jobs where id = $1",
                enq.id,
            )
            if row["deferrals"] == 1:
                break
            await asyncio.sleep(0.02)
    assert (row["status"], row["attempts"], row["deferrals"]) == ("pending", 0, 1)
    assert dt.timedelta(seconds=100) < row["wait"] <= dt.timedelta(seconds=120)


async def test_retries_back_off_and_stop_at_max_attempts(db_dsn: str, db: asyncpg.Connection) -> None:
    starts: list[float] = []

    async def always_fails(job: JobContext) -> None:
        starts.append(time.monotonic())
        raise RuntimeError(f"attempt {job.attempt} failed")

    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=4)
    base = 0.2
    worker = make_worker(db_dsn, {"test.kind": always_fails}, retry_base_seconds=base, poll_seconds=0.05)
    async with running(worker):
        job = await finished(db, enq.id)
    assert (job.status, job.attempts, len(starts)) == ("failed", 4, 4)
    assert job.error is not None and "attempt 4 failed" in job.error
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"gaps between attempts: {[round(g, 3) for g in gaps]}")
    # Equal jitter: the wait after failure n is at least half of base * 2^(n-1).
    for n, gap in enumerate(gaps, start=1):
        assert gap >= base * 2 ** (n - 1) / 2 - 0.01


# ---------------------------------------------------------------------------
# cancel


@pytest.mark.parametrize("heard_from", ["kyrie_job_events", "heartbeat"])
async def test_a_cancel_stops_the_running_handler_within_a_second(
    db_dsn: str, db: asyncpg.Connection, heard_from: str
) -> None:
    started = asyncio.Event()
    stopped_at: list[float] = []

    async def long_running(job: JobContext) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped_at.append(time.monotonic())
            raise

    enq = await queue.enqueue(db, "test.kind", {})
    # Through events: heartbeats too rare to matter.  Through heartbeats: no LISTEN at all.
    options = {"heartbeat_seconds": 30.0, "lease_seconds": 90.0} if heard_from == "kyrie_job_events" else {
        "listen": False, "heartbeat_seconds": 0.3}
    worker = make_worker(db_dsn, {"test.kind": long_running}, **options)
    async with running(worker):
        await asyncio.wait_for(started.wait(), 30)
        cancelled_at = time.monotonic()
        job = await queue.cancel_job(db, enq.id, "user clicked cancel")
        assert job is not None and job.status == "cancelled"
        await wait_until(lambda: stopped_at, 10, what="the handler to be cancelled")
        await wait_until(lambda: worker.in_flight == 0, 10)
    took = stopped_at[0] - cancelled_at
    print(f"handler stopped {took * 1000:.0f} ms after the cancel ({heard_from})")
    assert took < 1.0
    job = await queue.get_job(db, enq.id)
    assert job is not None
    assert (job.status, job.error, job.attempts) == ("cancelled", "user clicked cancel", 1)


# ---------------------------------------------------------------------------
# limits


async def test_concurrency_limits_are_never_exceeded(db_dsn: str, db: asyncpg.Connection) -> None:
    now: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    async def tracked(job: JobContext) -> None:
        for key in ("all", job.kind):
            now[key] += 1
            peak[key] = max(peak[key], now[key])
        await asyncio.sleep(0.03)
        for key in ("all", job.kind):
            now[key] -= 1

    await queue.enqueue_many(db, "test.a", [{}] * 16)
    await queue.enqueue_many(db, "test.b", [{}] * 16)
    await queue.enqueue(db, "test.unknown", {})  # no handler here: left alone
    worker = make_worker(db_dsn, {"test.a": tracked, "test.b": tracked}, concurrency=4,
                         kind_concurrency={"test.a": 2})
    await asyncio.wait_for(worker.run_until_drained(), 60)
    print(f"peak in flight: {dict(peak)}")
    assert peak["all"] <= 4 and peak["test.a"] <= 2
    assert peak["all"] >= 2  # it did run jobs side by side
    stats = {s["kind"]: s for s in await queue.queue_stats(db)}
    assert stats["test.a"]["completed"] == stats["test.b"]["completed"] == 16
    assert stats["test.unknown"]["pending"] == 1


async def test_a_kind_limit_holds_across_workers(db_dsn: str, db: asyncpg.Connection) -> None:
    now = 0
    peak = 0

    async def tracked(job: JobContext) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.03)
        now -= 1

    await queue.set_kind_limit(db, "test.limited", 2)
    await queue.enqueue_many(db, "test.limited", [{}] * 12)
    workers = [make_worker(db_dsn, {"test.limited": tracked}, concurrency=3, poll_seconds=0.05)
               for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(w.run_until_drained() for w in workers)), 60)
    print(f"peak in flight across 3 workers: {peak}")
    assert 1 <= peak <= 2
    # A worker may leave while others hold the kind's slots; the last one leaves nothing due behind.
    assert await db.fetch("select status, attempts, run_at <= now() as due from public.jobs"
                          " where status <> 'completed'") == []


# ---------------------------------------------------------------------------
# time


async def test_a_scheduled_job_starts_when_due(db_dsn: str, db: asyncpg.Connection) -> None:
    run_at = await db.fetchval("select now() + interval '1 second'")
    enq = await queue.enqueue(db, "test.kind", {}, run_at=run_at)
    async with running(make_worker(db_dsn, {"test.kind": returns})):
        job = await finished(db, enq.id)
    assert job.status == "completed"
    assert job.started_at is not None and job.started_at >= run_at


async def test_leases_are_renewed_while_a_handler_runs(db_dsn: str, db: asyncpg.Connection) -> None:
    runs = 0

    async def longer_than_the_lease(job: JobContext) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(3)

    enq = await queue.enqueue(db, "test.kind", {})
    short_lease = {"lease_seconds": 1.0, "heartbeat_seconds": 0.2}
    first = make_worker(db_dsn, {"test.kind": longer_than_the_lease}, **short_lease)
    other = make_worker(db_dsn, {"test.kind": longer_than_the_lease}, **short_lease)
    async with running(first):
        await wait_until(lambda: runs, 10)
        async with running(other):  # would take the job over if the lease ran out
            job = await finished(db, enq.id)
    assert (job.status, job.attempts, runs) == ("completed", 1, 1)


# ---------------------------------------------------------------------------
# stopping, and lost notifications


async def test_stop_hands_back_unfinished_jobs_without_burning_attempts(
    db_dsn: str, db: asyncpg.Connection
) -> None:
    async def slow_or_quick(job: JobContext) -> None:
        await asyncio.sleep(job.payload["seconds"])

    quick = await queue.enqueue(db, "test.kind", {"seconds": 0.05}, max_attempts=1)
    slow = await queue.enqueue_many(db, "test.kind", [{"seconds": 60}] * 3, max_attempts=1)
    worker = make_worker(db_dsn, {"test.kind": slow_or_quick}, shutdown_grace_seconds=0.5)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: db.fetchval("select count(*) = 3 from public.jobs where status = 'running'"), 30)
    worker.stop()
    await asyncio.wait_for(task, 30)
    done = await queue.get_job(db, quick.id)
    assert done is not None and done.status == "completed"
    for job_id in slow:
        job = await queue.get_job(db, job_id)
        assert job is not None
        assert (job.status, job.attempts, job.lease_owner) == ("pending", 0, None)
        assert job.run_at <= dt.datetime.now(dt.UTC)


async def test_the_poll_finds_jobs_whose_notification_never_came(db_dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("alter table public.jobs disable trigger jobs_notify_inserted")
    async with running(make_worker(db_dsn, {"test.kind": returns}, poll_seconds=0.3)):
        await asyncio.sleep(0.5)  # the worker is idle, listening
        async with db.transaction():  # the trigger path, with the trigger off: no notification at all
            enq = await queue.enqueue(db, "test.kind", {"n": 1})
        job = await finished(db, enq.id)
    assert job.status == "completed"


async def test_a_forged_cancel_notification_stops_nothing(db_dsn: str, db: asyncpg.Connection) -> None:
    """Any session may pg_notify; the worker asks the row before stopping a handler."""
    started, release = asyncio.Event(), asyncio.Event()

    async def waits(job: JobContext) -> dict[str, Any]:
        started.set()
        await asyncio.wait_for(release.wait(), 30)
        return {"finished": True}

    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    enq = await queue.enqueue(db, "test.kind", {}, workspace_id=workspace, user_id=owner)
    # Heartbeats too rare to matter: only the notification could stop the handler.
    worker = make_worker(db_dsn, {"test.kind": waits}, heartbeat_seconds=30.0, lease_seconds=90.0)
    async with running(worker):
        await asyncio.wait_for(started.wait(), 30)
        forged = json.dumps({"id": str(enq.id), "status": "cancelled"})
        before = worker.stats["heartbeats"]
        async with acting_as(db, owner):
            for _ in range(200):  # and a flood of them: each costs at most a spaced-out heartbeat
                await db.execute("select pg_notify('kyrie_job_events', $1)", forged)
        await asyncio.sleep(1.0)  # a real cancel stops the handler well within this
        assert worker.in_flight == 1
        assert worker.stats["heartbeats"] - before <= 15
        release.set()
        job = await finished(db, enq.id)
    assert (job.status, job.attempts, job.result) == ("completed", 1, {"finished": True})


async def test_a_handler_that_completes_its_own_job_ends_its_attempt(
    db_dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute("create schema queue_test; create table queue_test.marks (job_id uuid)")
    enq = await queue.enqueue(db, "test.kind", {})
    worker = make_worker(db_dsn, {"test.kind": completes_in_own_transaction})
    async with running(worker):
        job = await finished(db, enq.id)
        await wait_until(lambda: worker.slots.idle, 10)
    assert (job.status, job.result) == ("completed", {"atomic": True})
    assert worker.stats["completed"] == 0  # no second write: the batch never saw it


# ---------------------------------------------------------------------------
# the Worker API, as an embedding program meets it


async def test_a_given_pool_serves_everything_but_listen(db_dsn: str, db: asyncpg.Connection) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=3, max_size=3)
    assert pool is not None
    try:
        await queue.enqueue_many(db, "test.kind", [{}] * 30)
        worker = make_worker(db_dsn, {"test.kind": returns}, pool=pool, concurrency=4)
        async with running(worker):
            assert await worker.ready(30)
            await wait_until(lambda: db.fetchval("select count(*) = 30 from public.jobs"
                                                 " where status = 'completed'"), 30)
            others = await db.fetchval("select count(*) from pg_stat_activity"
                                       " where datname = current_database() and pid <> pg_backend_pid()")
        assert others == 3 + 1  # the host's pool, and one LISTEN connection
        assert not pool.is_closing()  # the host's pool is the host's to close
    finally:
        await pool.close()


async def test_ready_means_listening_and_claimed(db_dsn: str) -> None:
    worker = make_worker(db_dsn, {"test.kind": returns})
    assert not await worker.ready(0)
    async with running(worker):
        assert await worker.ready(30)
        assert worker.listener_connected


async def test_claims_are_batched_apart_from_concurrency(db_dsn: str, db: asyncpg.Connection) -> None:
    async def slowish(job: JobContext) -> None:
        await asyncio.sleep(0.2)

    await queue.enqueue_many(db, "test.kind", [{}] * 12)
    worker = make_worker(db_dsn, {"test.kind": slowish}, concurrency=12, claim_batch=3)
    await asyncio.wait_for(worker.run_until_drained(), 60)
    batches = await db.fetch("select count(*) as n from public.jobs group by started_at")
    assert max(r["n"] for r in batches) <= 3  # one claim, one transaction timestamp
    assert await db.fetchval("select count(*) from public.jobs where status = 'completed'") == 12


@pytest.mark.parametrize("handle_signals", [False, True])
async def test_signal_handlers_are_the_hosts_unless_asked(db_dsn: str, handle_signals: bool) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    loop = asyncio.get_running_loop()
    host_calls: list[int] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: host_calls.append(1))
    try:
        worker = make_worker(db_dsn, {"test.kind": returns}, handle_signals=handle_signals)
        task = asyncio.create_task(worker.run())
        assert await worker.ready(30)
        os.kill(os.getpid(), signal.SIGTERM)
        if handle_signals:
            await asyncio.wait_for(task, 30)  # the worker's: it stopped
            assert host_calls == []
        else:
            await wait_until(lambda: host_calls, 10)  # the host's: the worker runs on
            assert not task.done()
            worker.stop()
            await asyncio.wait_for(task, 30)
        host_calls.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # after run(): the host's handler again
        await wait_until(lambda: host_calls, 10)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_a_worker_and_the_event_streams_share_one_listen_connection(
    db_dsn: str, db: asyncpg.Connection
) -> None:
    events = JobEvents(db_dsn)
    events.start()
    try:
        async with running(make_worker(db_dsn, {"test.kind": returns})) as _:
            assert await events.wait_connected(30)
            listeners = await db.fetchval("select count(*) from pg_stat_activity"
                                          " where datname = current_database() and query ilike 'listen%'")
            enq = await queue.enqueue(db, "test.kind", {})
            with events.follow(enq.id) as follower:
                await follower.changed(within=0.01)
                job = await finished(db, enq.id)
                assert await follower.changed(within=10)
        assert listeners == 1
        assert job.status == "completed"
        assert events.connected  # the worker left; the streams keep the connection
    finally:
        await events.stop()
