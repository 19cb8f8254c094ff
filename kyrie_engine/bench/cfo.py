"""One CFO analysis of a big workspace, with the offline model: where the time goes.

The workspace has 50 contracts and 200,000 worklogs (quick: 20,000) over a
year, generated set-based by `seed_volume`.  The analysis runs through the
real worker and handler (job claimed, tools run as the owner under RLS,
report checked, actions and completion in one transaction), so the split is
the production one:

    sql     time inside the figure functions (kyrie.contract_figures & co.)
    agent   the CrewAI loop minus that SQL: prompt building, tool dispatch,
            the offline model's rules, parsing and checking the report
    other   the rest of the handler: membership check, progress updates,
            writing actions and completing the job (one transaction)
    wall    claim to completion, as the handler measured it

CrewAI is imported before the clock starts (a worker pays that once per
process, not per job); its import time is reported on its own.  For the
same reason the runs share one connection pool, as a long-running worker's
jobs share its pool: each run used to start a worker with pools of its own,
so every analysis paid for opening its handler's connections (two, ~5-60
ms depending on the load), which a worker does once.  The analysis
runs `runs` times on the same data and the median is quoted, the first run
apart (cold caches).
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from typing import Any

import asyncpg

from kyrie_engine import queue
from kyrie_engine.agents.cfo import KIND, CFOAnalysis, offline_model
from kyrie_engine.seed import seed_volume
from kyrie_engine.worker import Worker


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _one_analysis(
    dsn: str, pool: asyncpg.Pool, conn: asyncpg.Connection, workspace_id: Any, user_id: Any
) -> dict[str, Any]:
    job = await queue.enqueue(conn, KIND, {}, workspace_id=workspace_id, user_id=user_id)
    handler = CFOAnalysis(offline_model(), model_name="offline")
    started = time.perf_counter()
    await Worker(dsn, {KIND: handler}, concurrency=1, pool=pool).run_until_drained()
    elapsed = time.perf_counter() - started
    row = await conn.fetchrow("select status, error, result from public.jobs where id = $1", job.id)
    if row["status"] != "completed":
        raise RuntimeError(f"the analysis ended {row['status']}: {row['error']}")
    result = json.loads(row["result"]) if isinstance(row["result"], str) else row["result"]
    timings = dict(result["timings_ms"])
    timings["enqueue_to_done"] = round(elapsed * 1000, 1)
    timings["actions"] = len(result["actions"])
    timings["tool_calls"] = len(result["tool_calls"])
    return timings


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    contracts, worklogs, runs = (50, 20_000, 3) if quick else (50, 200_000, 5)

    started = time.perf_counter()
    import crewai  # noqa: F401 - measured on its own: paid once per worker process

    import_s = time.perf_counter() - started
    _say(f"cfo: importing crewai took {import_s:.2f}s")

    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    try:
        started = time.perf_counter()
        today = dt.datetime.now(dt.UTC).date()
        seeded = await seed_volume(conn, today, contracts=contracts, worklogs=worklogs)
        await conn.execute("analyze")
        seconds = time.perf_counter() - started
        _say(f"cfo: seeded {contracts} contracts, {seeded.worklogs} worklogs in {seconds:.1f}s")

        samples = []
        for n in range(runs):
            timings = await _one_analysis(dsn, pool, conn, seeded.workspace_id, seeded.owner_id)
            _say(f"cfo: run {n + 1}: wall {timings['wall']} ms (sql {timings['sql']} ms, "
                 f"agent {timings['agent']} ms), {timings['tool_calls']} tool calls, "
                 f"{timings['actions']} actions")
            samples.append(timings)
    finally:
        await pool.close()
        await conn.close()

    warm = samples[1:] or samples

    def median(key: str) -> float:
        return round(statistics.median(float(s[key]) for s in warm), 1)

    return {
        "cfo_contracts": contracts,
        "cfo_worklogs": seeded.worklogs,
        "cfo_crewai_import_s": round(import_s, 2),
        "cfo_first_wall_ms": samples[0]["wall"],
        "cfo_wall_ms": median("wall"),
        "cfo_sql_ms": median("sql"),
        "cfo_agent_ms": median("agent"),
        "cfo_other_ms": round(median("wall") - median("sql") - median("agent"), 1),
        "cfo_enqueue_to_done_ms": median("enqueue_to_done"),
        "cfo_sql_share": round(median("sql") / median("wall"), 3),
    }
