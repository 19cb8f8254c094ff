"""The soak section of `kyrie-engine bench --only soak`: does the queue stay fast
while it runs for long, with retention on?

A producer enqueues no-op jobs continuously (batches of 1,000, keeping at most
`BACKLOG` pending) while one worker process drains them, with
`kyrie_engine.retention.run` beside it on short keep periods so it really
deletes as it goes (`KEEP`; production keeps days).  The worker notes the time
at every hundredth of the run; the figures compare the throughput of the last
tenth of the jobs with the first tenth (a queue that degrades as dead rows and
index entries pile up shows it there), and give the jobs table's size at the
end (with its indexes and TOAST) against its largest during the run.

1,000,000 jobs by default (KYRIE_BENCH_SOAK_JOBS for more), 50,000 with `--quick`; the suite runs a 2,000-job
smoke of the same code (`soak(dsn, 2000)`).  The worker runs in a process of
its own (`python -m kyrie_engine.bench.soak worker <dsn> <n>`), so the
producer does not share its event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg

from kyrie_engine import queue, retention
from kyrie_engine.bench.queue import run_child

KIND = "soak.noop"
# KYRIE_BENCH_SOAK_JOBS: a longer soak, to see past autovacuum's first visit.
JOBS = int(os.environ.get("KYRIE_BENCH_SOAK_JOBS", "1000000"))
QUICK_JOBS = 50_000
BATCH = 1_000
BACKLOG = 20_000  # pending jobs the producer keeps at most
CONCURRENCY = 500  # no-op handlers: the claim batch
KEEP = dt.timedelta(seconds=5)  # completed (and failed) jobs older than this are purged
RETENTION_INTERVAL_SECONDS = 2.0


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


_SIZE_SQL = """
select pg_total_relation_size('public.jobs') as total,
       (select count(*) from public.jobs) as rows,
       (select n_dead_tup from pg_stat_user_tables where relid = 'public.jobs'::regclass) as dead
"""


def _spawn_worker(dsn: str, n: int, keep: dt.timedelta) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kyrie_engine.bench.soak", "worker", dsn, str(n), str(keep.total_seconds())],
        stdout=subprocess.PIPE, text=True,
    )


async def soak(dsn: str, n: int, *, keep: dt.timedelta = KEEP, backlog: int = BACKLOG) -> dict[str, Any]:
    """Enqueue continuously while a worker process drains `n` jobs; the figures.

    The producer keeps going until the worker has handled its `n`, so the last
    tenth runs under the same load as the first (a final drain with the
    producer gone would flatter it); the backlog left then stays pending.
    """
    conn = await asyncpg.connect(dsn)
    try:
        proc = _spawn_worker(dsn, n, keep)
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"soak worker did not start: {line!r}")
        largest = 0
        started = time.monotonic()
        next_report = started + 10
        enqueued = pending = 0
        while proc.poll() is None:
            if pending > backlog or enqueued >= n + 2 * backlog:
                await asyncio.sleep(0.02)
            else:
                await queue.enqueue_many(conn, KIND, [{}] * BATCH)
                enqueued += BATCH
            # Counted every few batches: a count per batch would be a load of its own.
            if pending > backlog or enqueued % (5 * BATCH) == 0:
                pending = await conn.fetchval(
                    "select count(*) from public.jobs where status = 'pending' and kind = $1", KIND
                )
            now = time.monotonic()
            if now >= next_report:
                sizes = await conn.fetchrow(_SIZE_SQL)
                largest = max(largest, sizes["total"])
                mib = sizes["total"] / 2**20
                log(f"{now - started:6.0f} s  enqueued {enqueued:>9,}  pending {pending:>6,}  rows "
                    f"{sizes['rows']:>8,}  dead {sizes['dead'] or 0:>8,}  table {mib:7.1f} MiB")
                next_report = now + 10
        out, _ = await asyncio.to_thread(proc.communicate)
        if proc.returncode != 0:
            raise RuntimeError(f"soak worker failed with status {proc.returncode}")
        child = json.loads(out.strip().splitlines()[-1])
        end = await conn.fetchrow(_SIZE_SQL)
        states = dict(await conn.fetch("select status, count(*) from public.jobs group by status"))
    finally:
        await conn.close()
    if set(states) - {"pending", "completed"}:
        raise RuntimeError(f"soak jobs neither pending nor completed: {states}")

    marks = child["marks"]  # monotonic time at 0/100, 1/100, ..., 100/100 of the n jobs handled
    tenth = n / 10
    first = tenth / (marks[10] - marks[0])
    last = tenth / (marks[100] - marks[90])
    wall = marks[100] - marks[0]
    figures: dict[str, Any] = {
        "soak_jobs": n,
        "soak_wall_s": round(wall, 1),
        "soak_jobs_per_s": round(n / wall),
        "soak_first_tenth_jobs_per_s": round(first),
        "soak_last_tenth_jobs_per_s": round(last),
        "soak_last_vs_first": round(last / first, 2),
        "soak_table_bytes_end": end["total"],
        "soak_table_bytes_max": max(largest, end["total"]),
        "soak_rows_end": end["rows"],
        "soak_pending_end": states.get("pending", 0),
        "soak_purged": enqueued - end["rows"],
        "soak_keep_s": keep.total_seconds(),
    }
    log(f"{n:,} jobs in {wall:.0f} s ({n / wall:,.0f} jobs/s); first tenth {first:,.0f} jobs/s, last tenth "
        f"{last:,.0f} jobs/s ({last / first:.2f}x)")
    largest_mib = figures["soak_table_bytes_max"] / 2**20
    log(f"jobs table at the end: {end['total'] / 2**20:.1f} MiB, {end['rows']:,} rows, "
        f"{figures['soak_pending_end']:,} of them pending (largest {largest_mib:.1f} MiB); "
        f"retention deleted {figures['soak_purged']:,}")
    return figures


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    n = QUICK_JOBS if quick else JOBS
    log(f"{n:,} no-op jobs enqueued continuously and drained, retention keeping {KEEP.total_seconds():.0f} s")
    return await soak(dsn, n)


# ---------------------------------------------------------------------------
# the worker process


async def _worker(dsn: str, n: int, keep_seconds: float) -> dict[str, Any]:
    from kyrie_engine.worker import JobContext, Worker

    step = n / 100
    marks: list[float] = []
    handled = 0
    finished = asyncio.Event()

    async def noop(job: JobContext) -> None:
        nonlocal handled
        if handled == 0:
            marks.append(time.monotonic())
        handled += 1
        while len(marks) <= 100 and handled >= len(marks) * step:
            marks.append(time.monotonic())
        if handled >= n:
            finished.set()

    keep = dt.timedelta(seconds=keep_seconds)
    stop = asyncio.Event()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    # The worker's own retention purges every five minutes; the soak runs the
    # same `retention.run` on a seconds-long timer beside it instead.
    worker = Worker(dsn, {KIND: noop}, concurrency=CONCURRENCY, keep_completed=None, keep_failed=None)
    purging = asyncio.create_task(retention.run(
        pool, keep, keep, stop, first_delay_seconds=1.0, interval_seconds=RETENTION_INTERVAL_SECONDS,
        batch=5_000,
    ))
    running = asyncio.create_task(worker.run())
    print("ready", flush=True)
    await finished.wait()
    worker.stop()
    await running
    stop.set()
    await purging
    await pool.close()
    return {"marks": marks}


def main(argv: list[str]) -> int:
    role, dsn, n, keep_seconds = argv
    if role != "worker":
        raise SystemExit(f"unknown role {role!r}")
    result = run_child(_worker(dsn, int(n), float(keep_seconds)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
