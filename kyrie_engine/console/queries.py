"""Every query the console runs: the only console module that speaks SQL.

The overview's sections are SQL functions (migration 20261201000701, where
the choice of index behind each is explained); a job's page reads its row,
its attempts (kyrie.job_attempts, operators only) and the ai_actions it
proposed.  Retry and cancel go through kyrie_engine.queue, which calls the
same `kyrie.retry_job` / `kyrie.cancel_job` an operator calls from psql.
`kyrie-engine bench --only console` times each of these on a million jobs.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from kyrie_engine import queue

KINDS_SQL = "select * from kyrie.console_kinds()"
SERIES_SQL = "select * from kyrie.console_series($1, $2)"
WORKERS_SQL = "select * from kyrie.console_workers()"
# jobs_failed_idx (finished_at desc) where status = 'failed': the newest, without a sort.
FAILURES_SQL = """
select id, kind, workspace_id, attempts, error, finished_at
from public.jobs where status = 'failed' order by finished_at desc limit $1
"""
ATTEMPTS_SQL = """
select attempt, worker, started_at, finished_at, outcome, error, detail
from kyrie.job_attempts where job_id = $1 order by finished_at, id
"""
ACTIONS_SQL = """
select id, type, status, title, reason, payload, created_at, decided_at
from public.ai_actions where job_id = $1 order by created_at, id
"""
# A page of jobs of one status, newest first, optionally of one kind: keyset
# on (time, id) so page 100 costs what page 1 does.  Waiting and running jobs
# by when they were enqueued (jobs_pending_created_idx; the running set is
# small); finished ones by when they finished (jobs_finished_idx).  Migration
# 20261202000102 says why there is no index on status for this.
OPEN_JOBS_SQL = """
select id, kind, status, workspace_id, attempts, max_attempts, error, created_at, finished_at
from public.jobs
where status = $1 and ($2::text is null or kind = $2)
  and ($3::timestamptz is null or (created_at, id) < ($3, $4::uuid))
order by created_at desc, id desc limit $5
"""
FINISHED_JOBS_SQL = """
select id, kind, status, workspace_id, attempts, max_attempts, error, created_at, finished_at
from public.jobs
where status = $1 and finished_at is not null and ($2::text is null or kind = $2)
  and ($3::timestamptz is null or (finished_at, id) < ($3, $4::uuid))
order by finished_at desc, id desc limit $5
"""
FINISHED = frozenset({"completed", "failed", "cancelled"})
# kyrie.schedule_status (migration 20261201000501): a handful of rows, by name.
SCHEDULES_SQL = "select * from kyrie.schedule_status"
# kyrie.model_budget_status (migration 20261201000602): one row per model.
BUDGETS_SQL = "select * from kyrie.model_budget_status order by model"
RANGES = {
    "hour": (dt.timedelta(hours=1), dt.timedelta(minutes=1)),
    "day": (dt.timedelta(days=1), dt.timedelta(minutes=15)),
}


@dataclass
class Overview:
    kinds: list[asyncpg.Record]
    series: list[asyncpg.Record]
    failures: list[asyncpg.Record]
    workers: list[dict[str, Any]]
    range: str
    bucket_minutes: int
    at: dt.datetime


async def overview(conn: asyncpg.Connection, range_: str = "hour") -> Overview:
    span, bucket = RANGES[range_]
    now = await conn.fetchval("select now()")
    # Buckets aligned on whole bucket lengths, so a chart does not shift every second.
    since = now - span
    since = since - dt.timedelta(seconds=since.timestamp() % bucket.total_seconds())
    kinds = await conn.fetch(KINDS_SQL)
    series = await conn.fetch(SERIES_SQL, since, bucket)
    failures = await conn.fetch(FAILURES_SQL, 8)
    workers = [
        {**dict(r), "running": json.loads(r["running"])} for r in await conn.fetch(WORKERS_SQL)
    ]
    return Overview(kinds, series, failures, workers, range_, int(bucket.total_seconds() // 60), now)


@dataclass
class JobStory:
    job: queue.Job
    attempts: list[asyncpg.Record]
    actions: list[dict[str, Any]]
    timeline: list[dict[str, Any]]


def _timeline(job: queue.Job, attempts: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """What happened to the job, oldest first: enqueued, each ended attempt, then its state now."""
    events: list[dict[str, Any]] = [{"at": job.created_at, "what": "enqueued", "tone": "info",
                                     "text": f"kind {job.kind}, priority {job.priority}"}]
    for a in attempts:
        events.append({
            "at": a["finished_at"], "what": f"attempt {a['attempt']} {a['outcome']}",
            "tone": "bad" if a["outcome"] in ("failed", "lost") else "warn",
            "worker": a["worker"], "started": a["started_at"], "text": a["error"] or "",
            "detail": a["detail"],
        })
    if job.status == "running":
        events.append({"at": job.started_at, "what": f"attempt {job.attempts} running",
                       "tone": "info", "worker": job.lease_owner, "text": ""})
    elif job.status == "pending" and job.run_at > job.created_at and job.attempts + len(attempts) > 0:
        events.append({"at": job.run_at, "what": "due again", "tone": "info", "text": "waiting for a worker"})
    elif job.status == "completed":
        events.append({"at": job.finished_at, "what": f"attempt {job.attempts} completed",
                       "tone": "good", "started": job.started_at, "text": ""})
    elif job.status == "cancelled":
        events.append({"at": job.finished_at or job.updated_at, "what": "cancelled",
                       "tone": "warn", "text": job.error or ""})
    elif job.status == "failed" and not any(a["outcome"] == "failed" for a in attempts):
        events.append({"at": job.finished_at, "what": "failed", "tone": "bad", "text": job.error or ""})
    return events


async def job_story(conn: asyncpg.Connection, job_id: uuid.UUID) -> JobStory | None:
    job = await queue.get_job(conn, job_id)
    if job is None:
        return None
    attempts = list(await conn.fetch(ATTEMPTS_SQL, job_id))
    rows = await conn.fetch(ACTIONS_SQL, job_id)
    actions = [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]
    return JobStory(job, attempts, actions, _timeline(job, attempts))


async def jobs_page(
    conn: asyncpg.Connection, status: str, kind: str | None,
    before: tuple[dt.datetime, uuid.UUID] | None, limit: int = 50,
) -> list[asyncpg.Record]:
    """`before` is the last row's (page_time, id): see `page_time`."""
    at, last = before if before is not None else (None, None)
    sql = FINISHED_JOBS_SQL if status in FINISHED else OPEN_JOBS_SQL
    return list(await conn.fetch(sql, status, kind, at, last, limit))


def page_time(status: str) -> str:
    """The column a page of `status` jobs is ordered by."""
    return "finished_at" if status in FINISHED else "created_at"


async def schedules(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every schedule with its last slot enqueued (and that job) and its next slot."""
    return list(await conn.fetch(SCHEDULES_SQL))


async def budgets(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Each model's shared Groq budget: its limits, what is left now and what was spent."""
    return list(await conn.fetch(BUDGETS_SQL))
