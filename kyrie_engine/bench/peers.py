"""`kyrie-engine bench --peers`: kyrie-engine beside PgQueuer and the bare SKIP LOCKED loop.

Three measurements, the same harness for every system, each system on a
fresh database of its own per round (PgQueuer's gets its own schema only):

- drain: N no-op jobs already queued, drained by one worker process;
- pickup: a producer enqueues one job every 5 ms, each committed on its own;
  milliseconds from the moment the enqueue returned (committed) to the
  producer to the moment the handler starts (both processes read the same
  CLOCK_MONOTONIC), with the worker idle and listening;
- enqueue: 50 connections enqueue single jobs as fast as they can, each
  through the system's own enqueue call, with one listener connected.

How each system is set up, so the comparison is fair (also printed).  Every
child process runs on uvloop when it is installed, as `kyrie-engine worker`
and PgQueuer's own CLI (`pgq run`) do.

- kyrie-engine: `Worker(concurrency=500, claim_batch=250, pool_size=2)` as
  the queue section runs it; enqueue with `queue.enqueue` (wake-up after the commit, shared).
- PgQueuer: installed with `Queries.install()` at its default durability
  (`durable`: logged tables, as kyrie's jobs are) and its recommended
  autovacuum settings (`optimize_autovacuum()`, what `pgq autovac` applies);
  asyncpg driver, one connection per `QueueManager` as its performance guide
  recommends.  Drain runs `QueueManager.run(mode=drain)` in the shapes of
  PgQueuer's own benchmark (`tools/benchmark.py`: 5 managers x batch 10) and
  larger batches; the best shape counts.  Pickup runs one manager at batch
  10 (its default).  Enqueue: `Queries.enqueue(entrypoint, None)`, one
  statement, its insert trigger NOTIFYing in the commit.
- bare: the queue section's loop (claim with UPDATE ... SKIP LOCKED, complete
  by id), best of its shapes; pickup with 4 connections; enqueue is a plain
  INSERT into `public.jobs` per statement, the trigger's NOTIFY in each
  commit.

Rounds repeat the whole set; medians are reported.  Ratios are kyrie's
figure over the peer's (for pickup, a ratio under 1 means kyrie is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg

from kyrie_engine.bench import queue as kq

PGQ_DRAIN_SHAPES = ((5, 10), (1, 100), (1, 500))  # (managers, batch size) in one process
PGQ_PICKUP_BATCH = 10
PGQ_ENTRYPOINT = "bench_noop"
SYSTEMS = ("kyrie-engine", "PgQueuer", "bare")

FigureSet = dict[str, float | str]


def pgqueuer_version() -> str | None:
    try:
        return importlib.metadata.version("pgqueuer")
    except importlib.metadata.PackageNotFoundError:
        return None


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# PgQueuer child processes: `python -m kyrie_engine.bench.peers <role> <dsn>`


async def _pgq_drain(dsn: str, managers: int, batch: int) -> dict[str, float]:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    done = 0
    qms = []
    for _ in range(managers):
        qm = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(dsn))))

        @qm.entrypoint(PGQ_ENTRYPOINT)
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        qms.append(qm)
    start = time.monotonic()
    await asyncio.gather(*(qm.run(batch_size=batch, mode=QueueExecutionMode.drain) for qm in qms))
    return {"seconds": time.monotonic() - start, "completed": done}


async def _pgq_serve(dsn: str, batch: int) -> dict[str, float]:
    """Handler start times by job id, printed when SIGTERM ends the manager."""
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.errors import FailingListenerError

    started: dict[str, float] = {}
    qm = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(dsn))))

    @qm.entrypoint(PGQ_ENTRYPOINT)
    async def noop(job: Any) -> None:
        started[str(job.id)] = time.monotonic()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    run = asyncio.create_task(qm.run(batch_size=batch))
    # Its LISTEN is set up inside run(): ready once its own NOTIFY round trip succeeds.
    for _ in range(60):
        try:
            await qm.listener_healthy(timeout=timedelta(seconds=0.5))
            break
        except FailingListenerError:
            if run.done():
                await run
    else:
        raise RuntimeError("PgQueuer's listener did not come up")
    print("ready", flush=True)
    await run
    return started


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["pgq-drain", "pgq-serve"])
    parser.add_argument("dsn")
    parser.add_argument("--managers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=10)
    args = parser.parse_args(argv)
    if args.role == "pgq-drain":
        result: Any = kq.run_child(_pgq_drain(args.dsn, args.managers, args.batch))
    else:
        result = kq.run_child(_pgq_serve(args.dsn, args.batch))
    print(json.dumps(result), flush=True)


def _spawn(role: str, dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kyrie_engine.bench.peers", role, dsn, *args],
        stdout=subprocess.PIPE, text=True,
    )


# ---------------------------------------------------------------------------
# shared measurements


async def _pickup(
    seconds: float, proc: subprocess.Popen[str], enqueue: Callable[[], Awaitable[str]]
) -> dict[str, float]:
    """Enqueue at kq.RATE per second against a listening child; return its handler start times."""
    try:
        await kq._ready(proc)
        await asyncio.sleep(0.5)
        committed: dict[str, float] = {}
        start = time.monotonic()
        for i in range(int(seconds * kq.RATE)):
            delay = start + i / kq.RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            job_id = await enqueue()
            committed[job_id] = time.monotonic()
        await asyncio.sleep(1.0)  # the last jobs start well within this
    finally:
        proc.send_signal(signal.SIGTERM)
    started = await kq._child_result(proc)
    missing = set(committed) - set(started)
    if missing:
        raise RuntimeError(f"{len(missing)} pickup jobs never started")
    return {k: (started[k] - t) * 1000 for k, t in committed.items()}


def _latency_figures(ms: list[float]) -> FigureSet:
    return {"pickup_p50_ms": round(statistics.median(ms), 2),
            "pickup_p99_ms": round(kq.percentile(ms, 99), 2)}


async def _enqueue_rate(
    dsn: str, seconds: float, channel: str, enqueue: Callable[[asyncpg.Connection], Awaitable[Any]]
) -> float:
    conns = [await asyncpg.connect(dsn) for _ in range(kq.ENQUEUE_CONNECTIONS)]
    listener = await asyncpg.connect(dsn)  # as a worker would be
    await listener.add_listener(channel, lambda *_: None)
    count = 0
    stop = time.monotonic() + seconds

    async def producer(conn: asyncpg.Connection) -> None:
        nonlocal count
        while time.monotonic() < stop:
            await enqueue(conn)
            count += 1

    start = time.monotonic()
    await asyncio.gather(*(producer(c) for c in conns))
    rate = count / (time.monotonic() - start)
    for conn in [listener, *conns]:
        await conn.close()
    return rate


# ---------------------------------------------------------------------------
# the three systems


async def measure_kyrie(dsn: str, n: int, pickup_s: float, enqueue_s: float) -> FigureSet:
    conn = await asyncpg.connect(dsn)
    try:
        drain = await kq._throughput(conn, dsn, n, "worker-drain")
        ms = await kq._latency(conn, dsn, pickup_s, "worker-serve")
    finally:
        await conn.close()

    async def enqueue(c: asyncpg.Connection) -> None:
        await kq.queue.enqueue(c, "bench.enqueue", {})

    rate = await _enqueue_rate(dsn, enqueue_s, "kyrie_jobs", enqueue)
    return {"drain_jobs_per_s": round(n / drain["seconds"]), **_latency_figures(ms),
            "enqueue_jobs_per_s": round(rate)}


async def measure_bare(dsn: str, n: int, pickup_s: float, enqueue_s: float) -> FigureSet:
    conn = await asyncpg.connect(dsn)
    try:
        best, shape = 0.0, ""
        for k, batch in kq.CEILING_SHAPES:
            result = await kq._throughput(conn, dsn, n, "bare-drain", "--connections", str(k),
                                          "--batch", str(batch))
            if n / result["seconds"] > best:
                best, shape = n / result["seconds"], f"{k}x{batch}"
        ms = await kq._latency(conn, dsn, pickup_s, "bare-serve", "--connections", "4")
    finally:
        await conn.close()

    async def enqueue(c: asyncpg.Connection) -> None:
        await c.execute("insert into public.jobs (kind) values ('bench.enqueue')")

    rate = await _enqueue_rate(dsn, enqueue_s, "kyrie_jobs", enqueue)
    return {"drain_jobs_per_s": round(best), "drain_shape": shape, **_latency_figures(ms),
            "enqueue_jobs_per_s": round(rate)}


async def measure_pgqueuer(dsn: str, n: int, pickup_s: float, enqueue_s: float) -> FigureSet:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    try:
        await queries.install()
        await queries.optimize_autovacuum()
        best, shape = 0.0, ""
        for managers, batch in PGQ_DRAIN_SHAPES:
            for start in range(0, n, 5000):
                size = min(5000, n - start)
                await queries.enqueue([PGQ_ENTRYPOINT] * size, [None] * size, [0] * size)
            await conn.execute("vacuum analyze pgqueuer")
            result = await kq._child_result(_spawn("pgq-drain", dsn, "--managers", str(managers),
                                                   "--batch", str(batch)))
            left = await conn.fetchval("select count(*) from pgqueuer")
            if left or result["completed"] != n:
                raise RuntimeError(f"PgQueuer left {left} jobs, ran {result['completed']} of {n}")
            rate = n / result["seconds"]
            log(f"PgQueuer drain, {managers} manager(s) x batch {batch}: {rate:.0f} jobs/s")
            if rate > best:
                best, shape = rate, f"{managers}x{batch}"

        await conn.execute("vacuum analyze pgqueuer")

        async def one() -> str:
            ids = await queries.enqueue(PGQ_ENTRYPOINT, None)
            return str(ids[0])

        proc = _spawn("pgq-serve", dsn, "--batch", str(PGQ_PICKUP_BATCH))
        ms = list((await _pickup(pickup_s, proc, one)).values())
    finally:
        await conn.close()

    # One Queries per connection, built once, as an application would hold it.
    per_conn: dict[int, Any] = {}

    async def enqueue_cached(c: asyncpg.Connection) -> None:
        q = per_conn.get(id(c))
        if q is None:
            q = per_conn[id(c)] = Queries(AsyncpgDriver(c))
        await q.enqueue(PGQ_ENTRYPOINT, None)

    rate = await _enqueue_rate(dsn, enqueue_s, "ch_pgqueuer", enqueue_cached)
    return {"drain_jobs_per_s": round(best), "drain_shape": shape, **_latency_figures(ms),
            "enqueue_jobs_per_s": round(rate)}


MEASURES = {"kyrie-engine": measure_kyrie, "PgQueuer": measure_pgqueuer, "bare": measure_bare}


def configurations() -> dict[str, str]:
    return {
        "kyrie-engine": f"Worker(concurrency={kq.WORKER_CONCURRENCY}, claim_batch={kq.WORKER_CLAIM_BATCH}, "
                        "pool_size=2); queue.enqueue "
                        "(wake-up after commit, shared)",
        "PgQueuer": f"{pgqueuer_version()}, durable, autovacuum tuned (pgq autovac), asyncpg, one "
                    f"connection per QueueManager; drain best of (managers x batch) "
                    f"{', '.join(f'{m}x{b}' for m, b in PGQ_DRAIN_SHAPES)}; pickup batch "
                    f"{PGQ_PICKUP_BATCH}; Queries.enqueue (NOTIFY in commit)",
        "bare": "UPDATE ... FOR UPDATE SKIP LOCKED claim + complete by id, best of (connections x "
                f"batch) {', '.join(f'{k}x{b}' for k, b in kq.CEILING_SHAPES)}; pickup 4 connections; "
                "plain INSERT (NOTIFY in commit)",
        "event loop": "each system's process on " + (
            "uvloop" if kq.event_loop_factory() is not None else "asyncio (uvloop is not installed)"),
    }


def _median(rounds: list[FigureSet], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in rounds))


def table(results: dict[str, list[FigureSet]]) -> tuple[str, dict[str, float | str]]:
    """The printed table and the flat figures (`peers_<system>_<figure>`, `peers_ratio_...`)."""
    keys = ("drain_jobs_per_s", "pickup_p50_ms", "pickup_p99_ms", "enqueue_jobs_per_s")
    heads = ("drain jobs/s", "pickup p50 ms", "pickup p99 ms", "enqueue 50 conns jobs/s")
    med = {s: {k: _median(r, k) for k in keys} for s, r in results.items()}
    figures: dict[str, float | str] = {}
    rows: list[tuple[str, ...]] = [("system", *heads)]
    for system, values in med.items():
        slug = system.lower().replace("-", "_")
        shapes = "/".join(dict.fromkeys(str(r["drain_shape"]) for r in results[system] if "drain_shape" in r))
        rows.append((system + (f" (drain {shapes})" if shapes else ""),
                     *(f"{values[k]:,.0f}" if k.endswith("per_s") else f"{values[k]:.2f}" for k in keys)))
        figures.update({f"peers_{slug}_{k}": values[k] for k in keys})
    for peer in ("PgQueuer", "bare"):
        if peer in med and "kyrie-engine" in med:
            ratios = [med["kyrie-engine"][k] / med[peer][k] if med[peer][k] else 0.0 for k in keys]
            rows.append((f"kyrie/{peer}", *(f"{r:.2f}x" for r in ratios)))
            slug = peer.lower()
            figures.update({f"peers_ratio_kyrie_{slug}_{k}": round(r, 3) for k, r in zip(keys, ratios,
                                                                                         strict=True)})
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines), figures


async def run_peers(
    fresh: Callable[[bool], Awaitable[tuple[str, str]]],
    drop: Callable[[str], Awaitable[None]],
    quick: bool,
    rounds: int,
) -> dict[str, float | str]:
    """`fresh(migrated)` makes a database and returns (name, dsn); `drop(name)` removes it."""
    n = 2_000 if quick else 20_000
    pickup_s = 3.0 if quick else 10.0
    enqueue_s = 1.5 if quick else 4.0
    configs = configurations()
    print("== peers ==", file=sys.stderr)
    for system, config in configs.items():
        log(f"{system}: {config}")
    results: dict[str, list[FigureSet]] = {s: [] for s in SYSTEMS}
    for r in range(rounds):
        for system in SYSTEMS:
            name, dsn = await fresh(system != "PgQueuer")
            try:
                figures = await MEASURES[system](dsn, n, pickup_s, enqueue_s)
            finally:
                await drop(name)
            log(f"round {r + 1}, {system}: {figures}")
            results[system].append(figures)
    text, figures = table(results)
    print(f"\n{n:,} no-op jobs drained by one process; pickup at {kq.RATE} jobs/s for {pickup_s:.0f} s; "
          f"enqueue {kq.ENQUEUE_CONNECTIONS} connections for {enqueue_s:.0f} s; median of {rounds} "
          f"round(s), each system on a fresh database\n", file=sys.stderr)
    print(text, file=sys.stderr)
    print("\nconfigured as:", file=sys.stderr)
    for system, config in configs.items():
        print(f"  {system}: {config}", file=sys.stderr)
    figures["peers_rounds"] = rounds
    figures["peers_pgqueuer_version"] = pgqueuer_version() or ""
    return figures


if __name__ == "__main__":
    _child_main(sys.argv[1:])
