"""`kyrie-engine jobs list|show|retry|cancel|stats`: the queue from a terminal.

A thin client of the same views and functions an operator uses in psql
(`kyrie.queue_stats`, `kyrie.running_jobs`, `kyrie.recent_failures`,
`kyrie.retry_job`, `kyrie.cancel_job`), through `kyrie_engine.queue`.  A job
id may be given in full or as a unique prefix, as `git` takes commits.
Exit status: 0 done, 1 no such job or nothing to do, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any
from uuid import UUID

import asyncpg

from kyrie_engine import queue
from kyrie_engine.db import connect_kwargs, driver_dsn
from kyrie_engine.settings import database_url_from_env
from kyrie_engine.terminal import age, first_line, table, when


class CliError(Exception):
    """A message for the operator; exit status 1."""


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


# ---------------------------------------------------------------------------
# commands


async def resolve(conn: asyncpg.Connection, ref: str) -> UUID:
    try:
        return UUID(ref)
    except ValueError:
        pass
    prefix = ref.lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef-" for c in prefix):
        raise CliError(f"{ref!r} is not a job id (give the id, or at least its first 4 characters)")
    rows = await conn.fetch("select id from public.jobs where id::text like $1 || '%' limit 2", prefix)
    if not rows:
        raise CliError(f"no job {ref}")
    if len(rows) > 1:
        raise CliError(f"{ref} names more than one job: give more of the id")
    return UUID(str(rows[0]["id"]))


async def cmd_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    jobs = await queue.list_jobs(conn, status=args.status, kind=args.kind, workspace_id=args.workspace,
                                 limit=args.limit)
    if args.json:
        print(_json([j.model_dump(mode="json") for j in jobs]))
        return 0
    now = dt.datetime.now(dt.UTC)
    rows = [
        (j.id, j.kind, j.status, f"{j.attempts}/{j.max_attempts}", age(now - j.created_at),
         first_line(j.error, 50))
        for j in jobs
    ]
    print(table(["id", "kind", "status", "tries", "age", "error"], rows, numeric=(3, 4)))
    return 0


async def cmd_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    job = await queue.get_job(conn, await resolve(conn, args.id))
    if job is None:
        raise CliError(f"no job {args.id}")
    if args.json:
        print(_json(job.model_dump(mode="json")))
        return 0
    now = dt.datetime.now(dt.UTC)
    fields = [
        ("id", job.id), ("kind", job.kind), ("status", job.status),
        ("workspace", job.workspace_id or "-"), ("user", job.user_id or "-"),
        ("attempts", f"{job.attempts} of {job.max_attempts}"), ("priority", job.priority),
        ("run at", f"{when(job.run_at)}  ({age(job.run_at - now)} from now)" if job.run_at > now
         else when(job.run_at)),
        ("created", when(job.created_at)), ("started", when(job.started_at)),
        ("finished", when(job.finished_at)), ("updated", when(job.updated_at)),
    ]
    if job.status == "running":
        fields.append(("lease", f"{job.lease_owner}, {age((job.lease_expires_at or now) - now)} left"))
    if job.idempotency_key:
        fields.append(("idempotency key", job.idempotency_key))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key:<{width}}  {value}")
    for key, block in (("progress", job.progress), ("payload", job.payload), ("result", job.result),
                       ("usage", job.usage or None)):
        if block is not None:
            print(f"\n{key}:\n" + _json(block))
    if job.error:
        print("\nerror:\n" + job.error.rstrip())
    # The detail members do not see (kyrie.job_attempts): each attempt that did not complete.
    for a in await queue.job_attempts(conn, job.id):
        print(f"\nattempt {a['attempt']}: {a['outcome']} at {when(a['finished_at'])} on {a['worker'] or '-'}")
        for text in (a["error"], a["detail"]):
            if text:
                print(text.rstrip())
    return 0


async def cmd_retry(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    job_id = await resolve(conn, args.id)
    before = await queue.get_job(conn, job_id)
    job = await queue.retry_job(conn, job_id)
    if job is None or before is None:
        raise CliError(f"no job {args.id}")
    if before.status in ("running", "completed"):
        raise CliError(f"job {job.id} is {job.status}: only failed, cancelled or scheduled jobs are retried")
    print(f"job {job.id} is pending again (due now, attempt 1 of {job.max_attempts} next)"
          if before.status != "pending" else f"job {job.id} is due now")
    return 0


async def cmd_cancel(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    """Reports what the cancel did, not what the job was when it was read: a
    job may finish between the two.  kyrie.cancel_job returns the row it
    cancelled, or the row unchanged; inside one transaction, `now()` is the
    cancel's own finished_at, which tells our cancel from an earlier one."""
    job_id = await resolve(conn, args.id)
    before = await queue.get_job(conn, job_id)
    async with conn.transaction():
        now = await conn.fetchval("select now()")
        job = await queue.cancel_job(conn, job_id, args.reason)
    if job is None or before is None:
        raise CliError(f"no job {args.id}")
    if job.status != "cancelled" or job.finished_at != now:
        if before.status in ("pending", "running"):
            raise CliError(f"job {job.id} became {job.status} before the cancel: nothing cancelled")
        raise CliError(f"job {job.id} is already {job.status}: nothing to cancel")
    tail = " (its worker stops the handler within a second)" if before.status == "running" else ""
    print(f"job {job.id} cancelled{tail}")
    return 0


async def cmd_stats(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    stats = await queue.queue_stats(conn)
    running = await queue.running_jobs(conn)
    failures = await queue.recent_failures(conn, args.failures)
    if args.json:
        print(_json({"kinds": stats, "running": running, "recent_failures": failures}))
        return 0
    counts = ("pending", "scheduled", "running", "completed", "failed", "cancelled")
    print(table(
        ["kind", *counts, "oldest pending"],
        [(s["kind"], *(s[c] for c in counts), age(s["oldest_pending_age"])) for s in stats],
        numeric=range(1, 8),
    ))
    print(f"\nrunning ({len(running)})")
    print(table(
        ["id", "kind", "try", "worker", "running for", "lease left", "step"],
        [(r["id"], r["kind"], r["attempt"], r["lease_owner"], age(r["running_for"]), age(r["lease_left"]),
          (r["progress"] or {}).get("step", "")) for r in running],
        numeric=(2, 4, 5),
    ))
    print(f"\nrecent failures (latest {args.failures})")
    print(table(
        ["id", "kind", "status", "tries", "when", "error"],
        [(f["id"], f["kind"], "retrying" if f["status"] == "pending" else f["status"],
          f"{f['attempts']}/{f['max_attempts']}", when(f["failed_at"]), first_line(f["error"], 50))
         for f in failures],
        numeric=(3,),
    ))
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "retry": cmd_retry, "cancel": cmd_cancel, "stats": cmd_stats}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kyrie-engine jobs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,show,retry,cancel,stats}")
    ls = sub.add_parser("list", help="latest jobs first")
    ls.add_argument("--status", choices=queue.STATUSES)
    ls.add_argument("--kind")
    ls.add_argument("--workspace", type=UUID, metavar="UUID")
    ls.add_argument("--limit", type=int, default=30)
    show = sub.add_parser("show", help="one job in full")
    show.add_argument("id")
    retry = sub.add_parser("retry", help="run a failed or cancelled job again (or a scheduled one now)")
    retry.add_argument("id")
    cancel = sub.add_parser("cancel", help="cancel a pending or running job")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="cancelled by an operator")
    stats = sub.add_parser("stats", help="counts by kind and status, running jobs, recent failures")
    stats.add_argument("--failures", type=int, default=10, metavar="N", help="how many failures to list")
    for command in (ls, show, stats):
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


async def _run(args: argparse.Namespace, dsn: str) -> int:
    conn = await asyncpg.connect(driver_dsn(dsn), **connect_kwargs(dsn))
    try:
        return await COMMANDS[args.command](conn, args)
    finally:
        await conn.close()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    dsn = database_url_from_env()
    try:
        return asyncio.run(_run(args, dsn))
    except CliError as exc:
        print(f"kyrie-engine jobs: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"kyrie-engine jobs: cannot reach the database: {exc}", file=sys.stderr)
        return 1
