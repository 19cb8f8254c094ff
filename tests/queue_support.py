"""Helpers for the queue tests, and a worker process they can kill.

`python tests/queue_support.py DSN [options]` runs a Worker whose handler
`test.sleep` records each run in `queue_test.runs` (job, attempt, pid) before
sleeping `payload["seconds"]`: the crash and shutdown tests count those rows to
tell a job that ran twice from one that never ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from kyrie_engine.worker import JobContext, Worker

# Short everything, so failures and expiries happen within a test's patience.
FAST = {"lease_seconds": 2.0, "heartbeat_seconds": 0.3, "poll_seconds": 0.2, "retry_base_seconds": 0.1}

RUNS_DDL = """
create schema if not exists queue_test;
create table if not exists queue_test.runs (
  job_id  uuid not null,
  attempt int not null,
  pid     int not null,
  at      timestamptz not null default clock_timestamp()
);
"""


async def wait_until(
    check: Callable[[], Awaitable[Any] | Any], within: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            _print_tasks()
            raise AssertionError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(interval)


def _print_tasks() -> None:
    """Where every task of this loop waits: what a stuck test needs to show."""
    for task in asyncio.all_tasks():
        where = []
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        print(f"--- task {task.get_name()}\n    " + "\n    ".join(where), file=sys.stderr)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """A worker running in the background for the block; stopped (gracefully) after it."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def statuses(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("select status, count(*) as n from public.jobs group by status")
    return {r["status"]: r["n"] for r in rows}


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Popen's preexec_fn for the worker processes the tests start: SIGKILL
    when the test process dies.  A pytest killed mid-run (a CI timeout, ^C
    twice) runs no finalizer, and its workers used to outlive it for as long
    as 40 minutes, retrying a database that was gone and taking CPU from
    whatever ran next (benchmarks included).  The signal follows the thread
    that called Popen, so spawn from the test's own thread, never from an
    executor's."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_worker(dsn: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), dsn, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> str:
    """Signal the process, wait for it, and return its stderr (for failure messages)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


async def record_and_sleep(job: JobContext) -> dict[str, Any]:
    async with job.pool.acquire() as conn:
        await conn.execute(
            "insert into queue_test.runs (job_id, attempt, pid) values ($1, $2, $3)",
            job.id, job.attempt, os.getpid(),
        )
    await asyncio.sleep(float(job.payload.get("seconds", 0)))
    return {"pid": os.getpid()}


async def record_and_query(job: JobContext) -> dict[str, Any]:
    """Like record_and_sleep, but the handler waits inside a database call."""
    async with job.pool.acquire() as conn:
        await conn.execute(
            "insert into queue_test.runs (job_id, attempt, pid) values ($1, $2, $3)",
            job.id, job.attempt, os.getpid(),
        )
        await conn.execute("select pg_sleep($1)", float(job.payload.get("seconds", 0)))
    return {"pid": os.getpid()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--lease", type=float, default=FAST["lease_seconds"])
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f %(name)s %(message)s")
    worker = Worker(
        args.dsn,
        {"test.sleep": record_and_sleep, "test.query": record_and_query},
        concurrency=args.concurrency,
        lease_seconds=args.lease,
        heartbeat_seconds=args.lease / 6,
        poll_seconds=FAST["poll_seconds"],
        shutdown_grace_seconds=args.grace,
        worker_id=args.worker_id,
        pool_size=4,
        handle_signals=True,
    )
    asyncio.run(worker.run())


if __name__ == "__main__":
    main()
