"""The queue section of `kyrie-engine bench`: throughput, pickup latency, enqueue rate, and their ceiling.

On one fresh database:

- throughput: N no-op jobs already queued, drained by one worker process
  (`Worker.run_until_drained`, batched claims and completions);
- pickup latency: a producer enqueues one job every 5 ms (200 jobs/s), each in
  its own transaction; latency is from the moment its COMMIT returns to the
  producer to the moment the handler starts (both processes read the same
  CLOCK_MONOTONIC), with the worker process idle and listening;
- enqueue: 50 connections enqueue single jobs as fast as they can through
  `queue.enqueue` (autocommit: wake-up sent after the commit, shared by
  concurrent callers), and for comparison with the NOTIFY inside each commit
  (the trigger path) and with no notification at all;
- the ceiling: the same throughput and latency for the bare loop every Postgres
  queue starts from: connections that each repeat one statement, "complete
  the first pending job" (UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
  LOCKED LIMIT 1)), one job per transaction, LISTENing for wake-ups when idle.
  No leases, no attempts, no handler, no job events: only what the database
  must do.

The worker and the ceiling loop each run in a process of their own
(`python -m kyrie_engine.bench.queue <role> <dsn>`), so the producer does not
share their event loop; that loop is uvloop when it is installed, as for
`kyrie-engine worker` (`run_child`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from kyrie_engine import queue
from kyrie_engine.service import event_loop_factory
from kyrie_engine.worker import JobContext, Worker

T = TypeVar("T")

WORKER_CONCURRENCY = 500
# Half the slots per claim: for millisecond jobs the handlers of one half run
# while the next half is claimed (the Worker docstring has the figures).
WORKER_CLAIM_BATCH = WORKER_CONCURRENCY // 2
# The bare loop's (connections, jobs per claim): one job per transaction as in
# every tutorial, and batched like the worker.  The best is the ceiling.
CEILING_SHAPES = ((4, 1), (16, 1), (1, WORKER_CONCURRENCY), (4, WORKER_CONCURRENCY // 4))
RATE = 200  # jobs per second for the latency run
ENQUEUE_CONNECTIONS = 50

# The bare loop: claim up to $2 due jobs, "run" them (note the time), complete them.
# Written as well as the table allows, so that it is a ceiling: the jobs in
# the order of the claim index (kind, workspace_id, priority desc, run_at),
# which for jobs without a workspace is (priority desc, run_at), so no sort
# of the whole backlog per claim; and the picked rows updated by primary key
# (`= any(array(...))`), not by a hash join over the whole table, which is
# what `id in (select ...)` is planned as.
_BARE_CLAIM = """
update public.jobs j
set status = 'running', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
    lease_owner = 'bare', lease_expires_at = now() + interval '30 seconds'
where j.id = any (array(
  select p.id from public.jobs p
  where p.status = 'pending' and p.kind = $1 and p.run_at <= now()
  order by p.kind, p.workspace_id, p.priority desc, p.run_at
  limit $2
  for update skip locked
))
returning j.id
"""
_BARE_COMPLETE = """
update public.jobs j
set status = 'completed', finished_at = now(), updated_at = now(), lease_owner = null,
    lease_expires_at = null, result = jsonb_build_object('t', $2::float8)
where j.id = any($1::uuid[])
"""


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------------------
# child processes


async def _noop(job: JobContext) -> dict[str, float]:
    return {"t": time.monotonic()}


async def _worker_drain(dsn: str) -> dict[str, float]:
    worker = Worker(dsn, {"bench.noop": _noop}, concurrency=WORKER_CONCURRENCY,
                    claim_batch=WORKER_CLAIM_BATCH, pool_size=2, handle_signals=False)
    start = time.monotonic()
    await worker.run_until_drained()
    return {"seconds": time.monotonic() - start, "completed": worker.stats["completed"]}


async def _worker_serve(dsn: str) -> None:
    worker = Worker(dsn, {"bench.latency": _noop}, concurrency=WORKER_CONCURRENCY, pool_size=2)
    task = asyncio.create_task(worker.run())
    while not worker.listener_connected and not task.done():  # noqa: ASYNC110 (no event to wait on)
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await task


async def _bare_loop(dsn: str, kind: str, connections: int, batch: int, drain: bool) -> dict[str, float]:
    wakes = [asyncio.Event() for _ in range(connections)]
    listener = await asyncpg.connect(dsn)

    def wake_all(*_: Any) -> None:
        for wake in wakes:
            wake.set()

    await listener.add_listener("kyrie_jobs", wake_all)
    # `kyrie.announced`, what the worker's claim and complete functions set:
    # no row-by-row kyrie_job_events for these updates (migration
    # 20261202000101).  The bare loop then sends none at all, which keeps it
    # a ceiling.
    conns = [await asyncpg.connect(dsn, server_settings={"kyrie.announced": "on"})
             for _ in range(connections)]
    done = 0

    async def loop(conn: asyncpg.Connection, wake: asyncio.Event) -> None:
        nonlocal done
        claim = await conn.prepare(_BARE_CLAIM)
        complete = await conn.prepare(_BARE_COMPLETE)
        while True:
            wake.clear()
            ids = [r["id"] for r in await claim.fetch(kind, batch)]
            if ids:
                await complete.fetch(ids, time.monotonic())
                done += len(ids)
                continue
            if drain:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await wake.wait()

    if not drain:
        print("ready", flush=True)
    start = time.monotonic()
    await asyncio.gather(*(loop(c, w) for c, w in zip(conns, wakes, strict=True)))
    seconds = time.monotonic() - start
    for conn in [listener, *conns]:
        await conn.close()
    return {"seconds": seconds, "completed": done}


async def _bare_serve(dsn: str, connections: int) -> None:
    """One job per claim, each on the first free connection: the least work between NOTIFY and "start"."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await _bare_loop(dsn, "bench.latency", connections, 1, False)


def run_child(main: Coroutine[Any, Any, T]) -> T:
    """A bench child's event loop is the one `kyrie-engine worker` runs on
    (uvloop when installed), which is also what PgQueuer's own CLI picks: each
    system measured as its command runs it."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker-drain", "worker-serve", "bare-drain", "bare-serve"])
    parser.add_argument("dsn")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.role == "worker-drain":
        print(json.dumps(run_child(_worker_drain(args.dsn))), flush=True)
    elif args.role == "worker-serve":
        run_child(_worker_serve(args.dsn))
    elif args.role == "bare-drain":
        result = run_child(_bare_loop(args.dsn, "bench.noop", args.connections, args.batch, True))
        print(json.dumps(result), flush=True)
    else:
        run_child(_bare_serve(args.dsn, args.connections))


def _spawn(role: str, dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kyrie_engine.bench.queue", role, dsn, *args],
        stdout=subprocess.PIPE, text=True,
    )


async def _child_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = await asyncio.to_thread(proc.communicate)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed with status {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


async def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if line.strip() != "ready":
        raise RuntimeError(f"bench child did not start: {line!r}")


# ---------------------------------------------------------------------------
# the measurements


async def _fill(conn: asyncpg.Connection, kind: str, n: int) -> None:
    for start in range(0, n, 5000):
        await queue.enqueue_many(conn, kind, [{}] * min(5000, n - start))
    await conn.execute("vacuum analyze public.jobs")


async def _throughput(conn: asyncpg.Connection, dsn: str, n: int, role: str, *args: str) -> dict[str, Any]:
    await _fill(conn, "bench.noop", n)
    result = await _child_result(_spawn(role, dsn, *args))
    left = await conn.fetchval(
        "select count(*) from public.jobs where kind = 'bench.noop' and status = 'pending'"
    )
    if left or result["completed"] != n:
        raise RuntimeError(f"{role} left {left} jobs pending, completed {result['completed']} of {n}")
    await conn.execute("delete from public.jobs where kind = 'bench.noop'")
    return result


async def _latency(conn: asyncpg.Connection, dsn: str, seconds: float, role: str, *args: str) -> list[float]:
    """Milliseconds from each enqueue's commit (as the producer saw it return) to its handler start."""
    await conn.execute("vacuum analyze public.jobs")
    proc = _spawn(role, dsn, *args)
    try:
        await _ready(proc)
        await asyncio.sleep(0.5)
        committed: dict[Any, float] = {}
        total = int(seconds * RATE)
        start = time.monotonic()
        for i in range(total):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with conn.transaction():
                enqueued = await queue.enqueue(conn, "bench.latency", {})
            committed[enqueued.id] = time.monotonic()
        deadline = time.monotonic() + 30
        while await conn.fetchval(
            "select count(*) from public.jobs where kind = 'bench.latency' and status <> 'completed'"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("latency jobs did not complete within 30 s")
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait)
    rows = await conn.fetch(
        "select id, (result->>'t')::float8 as t from public.jobs where kind = 'bench.latency'"
    )
    await conn.execute("delete from public.jobs where kind = 'bench.latency'")
    return [(r["t"] - committed[r["id"]]) * 1000 for r in rows]


async def _enqueue_rate(dsn: str, seconds: float, how: str) -> float:
    conns = [await asyncpg.connect(dsn) for _ in range(ENQUEUE_CONNECTIONS)]
    listener = await asyncpg.connect(dsn)  # as a worker would be
    await listener.add_listener("kyrie_jobs", lambda *_: None)
    if how == "none":
        await listener.execute("alter table public.jobs disable trigger jobs_notify_inserted")
    count = 0
    stop = time.monotonic() + seconds

    async def producer(conn: asyncpg.Connection) -> None:
        nonlocal count
        while time.monotonic() < stop:
            if how == "after commit":
                await queue.enqueue(conn, "bench.enqueue", {})
            else:  # "in commit", and "none" with the trigger off
                async with conn.transaction():
                    await queue.enqueue(conn, "bench.enqueue", {})
            count += 1

    start = time.monotonic()
    await asyncio.gather(*(producer(c) for c in conns))
    rate = count / (time.monotonic() - start)
    if how == "none":
        await listener.execute("alter table public.jobs enable trigger jobs_notify_inserted")
    await listener.execute("delete from public.jobs where kind = 'bench.enqueue'")
    for conn in [listener, *conns]:
        await conn.close()
    return rate


async def run(dsn: str, quick: bool) -> dict[str, float | int | str]:
    n = 2_000 if quick else 20_000
    latency_seconds = 3.0 if quick else 10.0
    enqueue_seconds = 1.5 if quick else 4.0
    conn = await asyncpg.connect(dsn)
    figures: dict[str, float | int | str] = {}
    try:
        log(f"throughput: {n} no-op jobs, one worker process (concurrency {WORKER_CONCURRENCY}, "
            f"claim_batch {WORKER_CLAIM_BATCH})")
        worker = await _throughput(conn, dsn, n, "worker-drain")
        figures["jobs_per_s"] = round(n / worker["seconds"])
        log(f"worker drained {n} in {worker['seconds']:.2f}s: {figures['jobs_per_s']} jobs/s")

        best = 0.0
        for k, batch in CEILING_SHAPES:
            shape = ("--connections", str(k), "--batch", str(batch))
            bare = await _throughput(conn, dsn, n, "bare-drain", *shape)
            rate = n / bare["seconds"]
            figures[f"bare_{k}x{batch}_jobs_per_s"] = round(rate)
            log(f"bare loop, {k} connection(s) x {batch} job(s) per claim: {n} in {bare['seconds']:.2f}s: "
                f"{rate:.0f} jobs/s")
            if rate > best:
                best, figures["ceiling_shape"] = rate, f"{k} connection(s) x {batch} job(s) per claim"

        figures["ceiling_jobs_per_s"] = round(best)
        figures["throughput_vs_ceiling"] = round(n / worker["seconds"] / best, 2)

        for label, role, args in (("pickup", "worker-serve", ()), ("ceiling_pickup", "bare-serve",
                                                                  ("--connections", "4"))):
            log(f"{label}: {RATE} jobs/s for {latency_seconds:.0f}s, "
                f"{'worker' if role == 'worker-serve' else 'bare loop'} idle and listening")
            ms = await _latency(conn, dsn, latency_seconds, role, *args)
            figures[f"{label}_p50_ms"] = round(statistics.median(ms), 2)
            figures[f"{label}_p99_ms"] = round(percentile(ms, 99), 2)
            figures[f"{label}_max_ms"] = round(max(ms), 2)
            log(f"{label}: p50 {figures[f'{label}_p50_ms']} ms, p99 {figures[f'{label}_p99_ms']} ms, "
                f"max {figures[f'{label}_max_ms']} ms over {len(ms)} jobs")

        for key, how in (("enqueue_jobs_per_s", "after commit"),
                         ("enqueue_notify_in_commit_jobs_per_s", "in commit"),
                         ("enqueue_no_notify_jobs_per_s", "none")):
            rate = await _enqueue_rate(dsn, enqueue_seconds, how)
            figures[key] = round(rate)
            log(f"enqueue, {ENQUEUE_CONNECTIONS} connections, wake-up {how}: {rate:.0f} jobs/s")
    finally:
        await conn.close()
    figures["queue_cpus"] = os.cpu_count() or 0
    return figures


if __name__ == "__main__":
    _child_main(sys.argv[1:])
