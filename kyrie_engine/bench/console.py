"""The console section of `kyrie-engine bench --only console`: every console page on a million jobs.

One fresh database, loaded with set-based SQL and every index, trigger and
constraint on: 1,000,000 jobs of five kinds finished over the last 30 days
(95% completed with token usage, 4% failed with an attempt recorded, 1%
cancelled), plus 5,000 pending (a fifth scheduled later), 40 running on 4
live workers (quick: 100,000 jobs).  ANALYZE, then each page is requested
through the app in this process (ASGI, signed in, no network): the time is the
server's, from the request arriving to its last byte (queries, templates,
SVG).  Medians and maxima of 15 runs per page after one warm-up; the target
is every page under 200 ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import asyncpg
import httpx
from pydantic import SecretStr

from kyrie_engine.api import build_app
from kyrie_engine.settings import Settings

TOKEN = "bench-console-token-" + "b" * 24
RUNS = 15
KINDS = ("cfo.analyze", "mail.send", "report.render", "sync.bank", "invoice.pdf")

LOAD_SQL = """
insert into public.jobs (kind, payload, status, attempts, max_attempts, run_at, created_at,
                         started_at, finished_at, updated_at, error, usage, result)
select k.kind, jsonb_build_object('n', g), o.status, 1, 5, t.due, t.due,
       t.due + (random() * interval '2 s'), t.due + interval '3 s' + (random() * interval '20 s'),
       t.due + interval '23 s',
       case when o.status = 'failed' then 'upstream answered 502 (attempt ' || (g % 5 + 1) || ')' end,
       case when k.kind = 'cfo.analyze' then jsonb_build_object('model', 'llama-3.3-70b-versatile',
            'questions', 1, 'total_tokens', 4000 + g % 3000) else '{}'::jsonb end,
       case when o.status = 'completed' then '{"ok": true}'::jsonb end
from generate_series(1, $1) g
cross join lateral (select $2::text[] as kinds) ks
cross join lateral (select ks.kinds[1 + g % 5] as kind) k
cross join lateral (select case when g % 100 < 95 then 'completed' when g % 100 < 99 then 'failed'
                                else 'cancelled' end as status) o
cross join lateral (select now() - interval '30 days' * (1 - g::float8 / $1) - interval '30 s' as due) t
"""
ATTEMPTS_SQL = """
insert into kyrie.job_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error, detail)
select id, 1, 'w-bench-1', started_at, finished_at, 'failed', error, 'Traceback (most recent call last): ...'
from public.jobs where status = 'failed'
"""
WAITING_SQL = """
insert into public.jobs (kind, status, run_at, created_at)
select ($2::text[])[1 + g % 5], 'pending',
       case when g % 5 = 0 then now() + interval '1 hour' else now() - (g % 600) * interval '1 s' end,
       now() - (g % 600) * interval '1 s'
from generate_series(1, $1) g
"""
WORKERS_SQL = """
insert into kyrie.workers (id, hostname, pid, kinds)
select 'w-bench-' || w, 'bench-' || w, 1000 + w, $1::text[] from generate_series(1, 4) w
"""
RUNNING_SQL = """
insert into public.jobs (kind, status, attempts, run_at, created_at, started_at,
                         lease_owner, lease_expires_at)
select ($2::text[])[1 + g % 5], 'running', 1, now() - interval '5 s', now() - interval '5 s', now(),
       'w-bench-' || (1 + g % 4), now() + interval '30 s'
from generate_series(1, $1) g
"""


async def _load(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await conn.execute(LOAD_SQL, jobs, list(KINDS))
        await conn.execute(ATTEMPTS_SQL)
        await conn.execute(WAITING_SQL, 5000, list(KINDS))
        await conn.execute(WORKERS_SQL, list(KINDS))
        await conn.execute(RUNNING_SQL, 40, list(KINDS))
        await conn.execute("analyze")
        print(f"  loaded {jobs:,} finished jobs + 5,000 waiting + 40 running in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        await conn.close()


async def _time(client: httpx.AsyncClient, path: str) -> tuple[float, float]:
    async def once() -> float:
        started = time.perf_counter()
        response = await client.get(path)
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, (path, response.status_code)
        return elapsed

    await once()  # warm-up: plans cached, pages of the indexes in memory
    runs = [await once() for _ in range(RUNS)]
    return statistics.median(runs), max(runs)


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    jobs = 100_000 if quick else 1_000_000
    await _load(dsn, jobs)
    settings = Settings(database_url=dsn, internal_secret=SecretStr("bench-internal-secret-" + "i" * 20),
                        console_token=SecretStr(TOKEN), llm="offline")
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
            signed = await client.post("/console/login", data={"token": TOKEN, "who": "bench"},
                                       headers={"Origin": "http://bench.test"})
            assert signed.status_code == 303
            async with app.state.runtime.pool.acquire() as conn:
                failed = await conn.fetchval(
                    "select id from jobs where status = 'failed' order by finished_at desc limit 1")
                old = await conn.fetchrow(
                    "select finished_at, id from jobs where status = 'completed' order by finished_at"
                    " limit 1 offset 5000")
            pages = {
                "overview_hour": "/console",
                "overview_day": "/console?range=day",
                "jobs_failed": "/console/jobs?status=failed",
                "jobs_completed_deep": "/console/jobs?status=completed&before_at="
                + old["finished_at"].isoformat().replace("+", "%2B") + f"&before_id={old['id']}",
                "jobs_pending_kind": "/console/jobs?status=pending&kind=cfo.analyze",
                "job": f"/console/jobs/{failed}",
            }
            figures: dict[str, Any] = {"console_jobs": jobs}
            worst = 0.0
            for name, path in pages.items():
                median, peak = await _time(client, path)
                worst = max(worst, peak)
                figures[f"console_{name}_ms"] = round(median, 1)
                figures[f"console_{name}_max_ms"] = round(peak, 1)
                print(f"  {name:<20} median {median:6.1f} ms   max {peak:6.1f} ms", file=sys.stderr)
            figures["console_worst_ms"] = round(worst, 1)
            figures["console_under_200ms"] = "yes" if worst < 200 else "no"
    return figures
