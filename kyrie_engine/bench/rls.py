"""The rls section of `kyrie-engine bench`: what Row Level Security costs a member's read.

On one fresh database, with set-based SQL and every constraint, trigger and
policy left on: 1,000 workspaces of five people each (an owner, an admin,
three members), eight hourly contracts each, 1,000,000 worklogs spread over a
year and inserted in date order, so that one workspace's rows are scattered
over the heap as they are in production (quick: 100 workspaces, 100,000).

Then two realistic reads, each timed as a member (acting_as: RLS applies) and
as service_role (bypasses RLS) filtered to the same workspace explicitly:

- quarter: a member's view of the quarter, hours and billable value per
  contract (the CFO figures' shape): worklogs joined to contracts, aggregated;
- latest: the latest 50 worklogs of the workspace (the app's time sheet).

The quarter query is the headline (`member_ms`, `service_role_ms`, `ratio`);
the member belongs to three workspaces, so `kyrie.my_workspace_ids()` returns
more than the one asked for, as it would for a consultant.  Medians of many
alternating runs, timed from the client (same round trip for both sides).

What RLS adds is a constant, not a per-row cost: each policed table in the
plan gets one hashed SubPlan calling kyrie.my_workspace_ids() once (a
SECURITY DEFINER function: a role and search_path switch, and on PostgreSQL
before 18 a re-plan of its SQL body per call), after which the filter is a
hash probe per row on top of the same index scans service_role uses.  So the
ratio is worst for the cheapest queries; `overhead_ms` is the absolute cost.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
import uuid
from typing import Any

import asyncpg

from kyrie_engine.db import acting_as

PEOPLE_PER_WORKSPACE = 5
CONTRACTS_PER_WORKSPACE = 8
QUARTER = (dt.date(2026, 1, 1), dt.date(2026, 4, 1))

QUARTER_SQL = """
select c.id, c.title, c.currency,
       sum(w.hours) as hours,
       sum(w.hours) filter (where w.billable) as billable_hours,
       sum(w.hours * c.hourly_rate) filter (where w.billable) as billable_value
from public.worklogs w
join public.contracts c on c.id = w.contract_id and c.workspace_id = w.workspace_id
where w.workspace_id = $1 and w.work_date >= $2 and w.work_date < $3
group by c.id, c.title, c.currency
order by c.title
"""

LATEST_SQL = """
select w.id, w.work_date, w.hours, w.description, w.user_id, w.contract_id
from public.worklogs w
where w.workspace_id = $1
order by w.work_date desc, w.created_at desc
limit 50
"""

# Person n*5 of workspace n is its owner, n*5+1 its admin, the next three its members.


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


async def _seed(conn: asyncpg.Connection, workspaces: int, worklogs: int) -> None:
    """Set-based, in one transaction; the triggers (owner membership) and foreign keys all run."""
    per_workspace = worklogs // workspaces
    async with conn.transaction():
        for statement, args in (
            ("create temp table bench_users on commit drop as "
             "select g as n, gen_random_uuid() as id from generate_series(0, $1::int - 1) g",
             (workspaces * PEOPLE_PER_WORKSPACE,)),
            ("create temp table bench_workspaces on commit drop as "
             "select g as n, gen_random_uuid() as id from generate_series(0, $1::int - 1) g", (workspaces,)),
            ("create temp table bench_contracts on commit drop as "
             "select w.n as ws_n, k, gen_random_uuid() as id "
             "from bench_workspaces w, generate_series(0, $1::int - 1) k", (CONTRACTS_PER_WORKSPACE,)),
            ("insert into auth.users (id, email) "
             "select id, format('bench-%s@example.test', n) from bench_users", ()),
            # The insert trigger makes the first person the owner member.
            ("insert into public.workspaces (id, name, created_by) "
             "select w.id, format('Workspace %s', w.n), u.id "
             "from bench_workspaces w join bench_users u on u.n = w.n * $1::int", (PEOPLE_PER_WORKSPACE,)),
            ("insert into public.workspace_members (workspace_id, user_id, role) "
             "select w.id, u.id, case when u.n % $1::int = 1 then 'admin' else 'member' end "
             "from bench_workspaces w join bench_users u "
             "on u.n > w.n * $1::int and u.n < (w.n + 1) * $1::int", (PEOPLE_PER_WORKSPACE,)),
            ("insert into public.contracts (id, workspace_id, client_name, title, billing_type, hourly_rate, "
             "                              currency, start_date, created_by) "
             "select c.id, w.id, format('Client %s', c.k), format('Contract %s', c.k), 'hourly', "
             "       60 + 15 * c.k, 'USD', date '2025-01-01', null "
             "from bench_contracts c join bench_workspaces w on w.n = c.ws_n", ()),
            # Date-major order: a workspace's rows land all over the heap, as they do in production.
            ("insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours, "
             "                             description, billable, invoiced) "
             "select w.id, c.id, u.id, date '2025-07-01' + (i * 365 / $1::int), "
             "       0.25 + (i * 7 + w.n) % 32 * 0.25, "
             "       format('Work item %s', i), (i + w.n) % 7 <> 0, false "
             "from generate_series(0, $1::int - 1) i "
             "cross join bench_workspaces w "
             "join bench_contracts c on c.ws_n = w.n and c.k = (i + w.n) % $2::int "
             "join bench_users u on u.n = w.n * $3::int + (i % $3::int) "
             "order by i, w.n",
             (per_workspace, CONTRACTS_PER_WORKSPACE, PEOPLE_PER_WORKSPACE)),
        ):
            await conn.execute(statement, *args)


async def _member_of_three(conn: asyncpg.Connection, workspaces: int) -> tuple[uuid.UUID, uuid.UUID]:
    """A plain member of workspace n/2, also added to two other workspaces: (member, workspace)."""
    target = await conn.fetchval("select id from public.workspaces where name = $1",
                                 f"Workspace {workspaces // 2}")
    member = await conn.fetchval(
        "select user_id from public.workspace_members where workspace_id = $1 and role = 'member' "
        "order by user_id limit 1", target)
    await conn.execute(
        "insert into public.workspace_members (workspace_id, user_id, role) "
        "select id, $1, 'member' from public.workspaces where name in ($2, $3)",
        member, f"Workspace {workspaces // 3}", f"Workspace {workspaces // 5}")
    return member, target


async def _timed(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], as_member: uuid.UUID | None) -> \
        tuple[float, int]:
    """One run in its own transaction, like one request: milliseconds for the query alone, rows."""
    if as_member is not None:
        async with acting_as(conn, as_member, readonly=True):
            start = time.perf_counter()
            rows = await conn.fetch(sql, *args)
            return (time.perf_counter() - start) * 1000, len(rows)
    async with conn.transaction(readonly=True):
        await conn.execute("set local role service_role")
        start = time.perf_counter()
        rows = await conn.fetch(sql, *args)
        return (time.perf_counter() - start) * 1000, len(rows)


async def _compare(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], member: uuid.UUID,
                   repeats: int) -> tuple[float, float]:
    """Medians (member, service_role), alternating so drift hits both alike; different rows are a bug."""
    member_ms: list[float] = []
    service_ms: list[float] = []
    for i in range(repeats + 5):
        m, m_rows = await _timed(conn, sql, args, member)
        s, s_rows = await _timed(conn, sql, args, None)
        if m_rows != s_rows:
            raise AssertionError(f"member saw {m_rows} rows, service_role {s_rows}: RLS changed the answer")
        if i >= 5:  # warm-up: plans cached, pages in shared buffers
            member_ms.append(m)
            service_ms.append(s)
    return statistics.median(member_ms), statistics.median(service_ms)


async def _explain(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], member: uuid.UUID) -> str:
    async with acting_as(conn, member, readonly=True):
        rows = await conn.fetch(f"explain (analyze, buffers, costs off, timing off) {sql}", *args)
    return "\n".join(r[0] for r in rows)


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    workspaces = 100 if quick else 1_000
    worklogs = 100_000 if quick else 1_000_000
    repeats = 50 if quick else 200
    conn = await asyncpg.connect(dsn)
    figures: dict[str, Any] = {}
    try:
        log(f"seeding {workspaces} workspaces, {worklogs} worklogs (set-based, RLS and constraints on)")
        start = time.perf_counter()
        await _seed(conn, workspaces, worklogs)
        await conn.execute("analyze")
        n = await conn.fetchval("select count(*) from public.worklogs")
        log(f"seeded {n} worklogs in {time.perf_counter() - start:.1f}s")
        member, workspace = await _member_of_three(conn, workspaces)

        quarter = (workspace, *QUARTER)
        member_ms, service_ms = await _compare(conn, QUARTER_SQL, quarter, member, repeats)
        log(f"quarter per contract: member {member_ms:.2f} ms, service_role {service_ms:.2f} ms "
            f"(x{member_ms / service_ms:.2f})")
        latest_member, latest_service = await _compare(conn, LATEST_SQL, (workspace,), member, repeats)
        log(f"latest 50: member {latest_member:.2f} ms, service_role {latest_service:.2f} ms "
            f"(x{latest_member / latest_service:.2f})")
        plan = await _explain(conn, QUARTER_SQL, quarter, member)
        for line in plan.splitlines()[:20]:
            log(f"| {line}")

        figures.update({
            "worklogs": n,
            "workspaces": workspaces,
            "member_ms": round(member_ms, 3),
            "service_role_ms": round(service_ms, 3),
            "ratio": round(member_ms / service_ms, 2),
            "overhead_ms": round(member_ms - service_ms, 3),
            "latest_member_ms": round(latest_member, 3),
            "latest_service_role_ms": round(latest_service, 3),
            "latest_ratio": round(latest_member / latest_service, 2),
            "plan": "\n".join(plan.splitlines()[:12]),
        })
    finally:
        await conn.close()
    return figures
