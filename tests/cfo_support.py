"""Books with known numbers, an independent reckoning of them, and one analysis run end to end.

`build_books` writes a workspace small enough that every figure of the CFO
analysis can be checked by hand (the expected values are spelled out in
`HAND_FIGURES`); `reckon` computes the same figures again from plain
aggregates over contracts and worklogs, written here rather than borrowed
from kyrie_engine/sql/20261125000006_cfo_figures.sql, so a wrong formula there cannot
also be the test's expectation.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

import asyncpg
from queue_support import FAST
from support import add_member, add_worklog, new_contract, new_user, new_workspace

from kyrie_engine import queue
from kyrie_engine.agents.cfo import KIND, CFOAnalysis, offline_model
from kyrie_engine.worker import Worker

D = dt.date
START, END = D(2026, 1, 1), D(2026, 3, 31)  # the analysed quarter, both ends included
PERIOD = {"period_start": START.isoformat(), "period_end": END.isoformat()}
TODAY = D(2026, 11, 25)  # the handler's "today", for runs without a period


@dataclass
class Books:
    workspace_id: UUID
    owner: UUID
    member: UUID
    contracts: dict[str, UUID] = field(default_factory=dict)


async def build_books(conn: asyncpg.Connection) -> Books:
    """Workspace A: three contracts, two currencies, one of each anomaly (see HAND_FIGURES)."""
    owner = await new_user(conn, "ana@books.test")
    member = await new_user(conn, "bo@books.test")
    ws = await new_workspace(conn, owner, "Books")
    await add_member(conn, ws, member, "member")
    books = Books(ws, owner, member)
    web = books.contracts["web"] = await new_contract(
        conn, ws, client_name="Acme", title="Website", hourly_rate=Decimal("100"), currency="USD",
        budget_hours=Decimal("40"), start_date=D(2025, 12, 1), end_date=D(2026, 3, 15),
    )
    app = books.contracts["app"] = await new_contract(
        conn, ws, client_name="Globex", title="App", billing_type="fixed", fixed_fee=Decimal("6000"),
        currency="USD", budget_hours=Decimal("60"), start_date=START,
    )
    ret = books.contracts["retainer"] = await new_contract(
        conn, ws, client_name="Initech", title="Retainer", hourly_rate=Decimal("80"), currency="EUR",
        start_date=D(2025, 6, 1),
    )
    log = [
        # Website: before the period (budget only), in it, after its end date, after the period.
        (web, owner, "10", D(2025, 12, 10), "Discovery", True, True),
        (web, owner, "8", D(2026, 1, 5), "Homepage", True, False),
        (web, member, "6", D(2026, 1, 6), "", False, False),  # no description, not billable
        (web, owner, "13", D(2026, 2, 10), "Launch crunch", True, False),  # with App: a 15-hour day
        (web, member, "4", D(2026, 3, 20), "Fixes after the end date", True, False),
        (web, owner, "5", D(2026, 4, 10), "After the period", True, False),
        # App (fixed fee 6000 over 60 budgeted hours: 100 an hour, capped at the fee).
        (app, member, "10", D(2026, 1, 15), "Screens", True, True),
        (app, member, "10", D(2026, 1, 16), "Sync", True, True),
        (app, owner, "2", D(2026, 2, 10), "Demo build", True, False),
        (app, member, "8", D(2026, 3, 1), "Scope creep", False, False),
        # Retainer (EUR, no budget).
        (ret, member, "1.5", D(2026, 2, 1), "Patching", True, True),
        (ret, member, "5", D(2026, 3, 2), " ", True, False),  # blank description
        (ret, owner, "2.5", D(2026, 3, 3), "Ticket triage", True, False),
    ]
    for contract, user, hours, day, text, billable, invoiced in log:
        await add_worklog(conn, contract, user, hours=Decimal(hours), work_date=day, description=text,
                          billable=billable, invoiced=invoiced)
    return books


# Every figure of build_books over START..END, worked out by hand.
HAND_FIGURES: dict[str, dict[str, Any]] = {
    "web": {
        "hours_logged": "31",  # 8 + 6 + 13 + 4
        "billable_hours": "25",  # 8 + 13 + 4
        "billable_value": "2500",  # 25 h x 100
        "budget_used_hours": "41",  # 10 before the period + 31
        "budget_used_pct": "102.50",
        "budget_remaining_hours": "-1",
        "over_budget": True,
        "effective_hourly_rate": None,  # hourly contract
        "unbilled_hours": "25",  # 35 billable to date - 10 invoiced
        "unbilled_value": "2500",
        "burn_rate_hours_per_week": "2.93",  # 31 h x 7 / 74 days (Jan 1 - Mar 15)
        "budget_exhausted_on": "2026-03-20",  # running total 37 -> 41 crosses 40
    },
    "app": {
        "hours_logged": "30",
        "billable_hours": "22",
        "billable_value": "2200",  # 22 h x (6000 / 60)
        "budget_used_hours": "30",
        "budget_used_pct": "50.00",
        "budget_remaining_hours": "30",
        "over_budget": False,
        "effective_hourly_rate": "200.00",  # 6000 / 30 h
        "unbilled_hours": "2",
        "unbilled_value": "200",
        "burn_rate_hours_per_week": "2.33",  # 30 x 7 / 90
        "budget_exhausted_on": "2026-06-29",  # Mar 31 + 30 h left / (30 h / 90 days)
    },
    "retainer": {
        "hours_logged": "9",
        "billable_hours": "9",
        "billable_value": "720",
        "budget_used_hours": "9",
        "budget_used_pct": None,
        "budget_remaining_hours": None,
        "over_budget": None,
        "effective_hourly_rate": None,
        "unbilled_hours": "7.5",
        "unbilled_value": "600",
        "burn_rate_hours_per_week": "0.70",
        "budget_exhausted_on": None,
    },
}
HAND_TOTALS: dict[str, dict[str, Any]] = {
    "USD": {"contracts": 2, "hours_logged": "61", "billable_hours": "47", "billable_value": "4700",
            "unbilled_hours": "27", "unbilled_value": "2700"},
    "EUR": {"contracts": 1, "hours_logged": "9", "billable_hours": "9", "billable_value": "720",
            "unbilled_hours": "7.5", "unbilled_value": "600"},
}


def hand_anomalies(books: Books) -> set[tuple[Any, ...]]:
    web, ret = books.contracts["web"], books.contracts["retainer"]
    return {
        ("day_over_12h", None, books.owner, 1, Decimal(15), D(2026, 2, 10), D(2026, 2, 10)),
        ("missing_description", web, None, 1, Decimal(6), D(2026, 1, 6), D(2026, 1, 6)),
        ("missing_description", ret, None, 1, Decimal(5), D(2026, 3, 2), D(2026, 3, 2)),
        ("outside_contract_dates", web, None, 1, Decimal(4), D(2026, 3, 20), D(2026, 3, 20)),
    }


# ---------------------------------------------------------------------------
# the independent reckoning

_SUMS = """
select c.id, c.currency, c.billing_type, c.hourly_rate, c.fixed_fee, c.budget_hours, c.start_date, c.end_date,
       coalesce(sum(w.hours) filter (where w.work_date >= $2), 0) as in_period,
       coalesce(sum(w.hours) filter (where w.work_date >= $2 and w.billable), 0) as billable_in_period,
       coalesce(sum(w.hours) filter (where w.work_date < $2 and w.billable), 0) as billable_before,
       coalesce(sum(w.hours) filter (where w.billable), 0) as billable_to_date,
       coalesce(sum(w.hours) filter (where w.invoiced), 0) as invoiced_to_date,
       coalesce(sum(w.hours) filter (where w.billable and not w.invoiced), 0) as unbilled,
       coalesce(sum(w.hours), 0) as to_date
from public.contracts c
left join public.worklogs w on w.contract_id = c.id and w.work_date <= $3
where c.workspace_id = $1
group by c.id
"""

# The first day on which a contract's running total of hours reached its budget.
_RAN_OUT = """
select distinct on (contract_id) contract_id, work_date
from (select w.contract_id, w.work_date,
             sum(w.hours) over (partition by w.contract_id order by w.work_date, w.id) as running
      from public.worklogs w where w.workspace_id = $1 and w.work_date <= $2) r
join public.contracts c on c.id = r.contract_id
where r.running >= c.budget_hours
order by contract_id, work_date
"""

_LONG_DAYS = """
select user_id, work_date, sum(hours) as hours from public.worklogs
where workspace_id = $1 and work_date between $2 and $3
group by user_id, work_date having sum(hours) > 12
"""

_PER_CONTRACT_ANOMALIES = """
select 'missing_description' as kind, w.contract_id, count(*)::int as n, sum(w.hours) as hours,
       min(w.work_date) as first, max(w.work_date) as last
from public.worklogs w
where w.workspace_id = $1 and w.work_date between $2 and $3 and btrim(w.description) = ''
group by w.contract_id
union all
select 'outside_contract_dates', w.contract_id, count(*)::int, sum(w.hours),
       min(w.work_date), max(w.work_date)
from public.worklogs w join public.contracts c on c.id = w.contract_id
where w.workspace_id = $1 and w.work_date between $2 and $3
  and (w.work_date < c.start_date or (c.end_date is not null and w.work_date > c.end_date))
group by w.contract_id
"""

CENT = Decimal("0.01")


def cents(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass
class Reckoning:
    contracts: dict[UUID, dict[str, Any]]
    totals: dict[str, dict[str, Any]]
    anomalies: set[tuple[Any, ...]]


async def reckon(conn: asyncpg.Connection, workspace: UUID, start: dt.date, end: dt.date) -> Reckoning:
    """The analysis's figures from first principles (as the superuser: this is the truth RLS bounds)."""
    ran_out = dict(await conn.fetch(_RAN_OUT, workspace, end))  # type: ignore[arg-type]
    contracts: dict[UUID, dict[str, Any]] = {}
    for c in await conn.fetch(_SUMS, workspace, start, end):
        fee = c["fixed_fee"]
        if c["billing_type"] == "hourly":
            rate, cap = c["hourly_rate"], None
        else:  # a fixed fee is worth fee / budget an hour, and never more than the fee
            rate, cap = (fee / c["budget_hours"] if c["budget_hours"] else None), fee

        def earned(hours: Decimal, rate: Decimal | None = rate, cap: Decimal | None = cap) -> Decimal | None:
            if rate is None:
                return None
            return hours * rate if cap is None else min(cap, hours * rate)

        def minus(a: Decimal | None, b: Decimal | None) -> Decimal | None:
            return None if a is None or b is None else a - b

        budget, to_date, period = c["budget_hours"], c["to_date"], c["in_period"]
        active = (min(end, c["end_date"] or end) - max(start, c["start_date"])).days + 1
        if budget is None:
            exhausted = None
        elif to_date >= budget:
            exhausted = ran_out[c["id"]]
        elif period > 0 and active > 0:
            exhausted = end + dt.timedelta(days=math.ceil((budget - to_date) * active / period))
            if c["end_date"] is not None and exhausted > c["end_date"]:
                exhausted = None  # the contract ends before its budget would run out
        else:
            exhausted = None
        contracts[c["id"]] = {
            "currency": c["currency"],
            "hours_logged": cents(period),
            "billable_hours": cents(c["billable_in_period"]),
            "billable_value": cents(minus(earned(c["billable_to_date"]), earned(c["billable_before"]))),
            "budget_used_hours": cents(to_date),
            "budget_used_pct": None if budget is None else cents(100 * to_date / budget),
            "budget_remaining_hours": None if budget is None else cents(budget - to_date),
            "over_budget": None if budget is None else to_date > budget,
            "effective_hourly_rate": cents(fee / to_date) if cap is not None and to_date > 0 else None,
            "unbilled_hours": cents(c["unbilled"]),
            "unbilled_value": cents(minus(earned(c["billable_to_date"]), earned(c["invoiced_to_date"]))),
            "burn_rate_hours_per_week": cents(period * 7 / active) if active > 0 else None,
            "budget_exhausted_on": exhausted,
        }

    totals: dict[str, dict[str, Any]] = {}
    for figures in contracts.values():
        t = totals.setdefault(figures["currency"], {"contracts": 0})
        t["contracts"] += 1
        for key in ("hours_logged", "billable_hours", "billable_value", "unbilled_hours", "unbilled_value"):
            if figures[key] is not None:
                t[key] = t.get(key, Decimal(0)) + figures[key]

    anomalies: set[tuple[Any, ...]] = set()
    per_user: dict[UUID, list[Any]] = {}
    for row in await conn.fetch(_LONG_DAYS, workspace, start, end):
        per_user.setdefault(row["user_id"], []).append((row["work_date"], row["hours"]))
    for user, days in per_user.items():
        dates = [d for d, _ in days]
        anomalies.add(("day_over_12h", None, user, len(days), cents(sum(h for _, h in days)),
                       min(dates), max(dates)))
    for row in await conn.fetch(_PER_CONTRACT_ANOMALIES, workspace, start, end):
        anomalies.add((row["kind"], row["contract_id"], None, row["n"], cents(row["hours"]),
                       row["first"], row["last"]))
    return Reckoning(contracts, totals, anomalies)


# ---------------------------------------------------------------------------
# comparing with what the analysis stored (JSON: numbers as numbers, dates and ids as text)


def same(stored: Any, expected: Any) -> bool:
    """A stored value (JSON, or the reckoning's own) equals an expected Decimal/date/bool/None or
    hand-written text ("2500", "2026-03-20")."""
    if isinstance(stored, dt.date):
        stored = stored.isoformat()
    if expected is None or isinstance(expected, bool):
        return stored is expected
    if isinstance(expected, dt.date):
        return stored == expected.isoformat()
    if isinstance(expected, str) and "-" in expected[1:]:
        return stored == expected
    if isinstance(stored, bool) or not isinstance(stored, int | float | Decimal):
        return False
    return Decimal(str(stored)) == Decimal(str(expected))


def mismatches(stored: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (stored.get(k), v) for k, v in expected.items() if not same(stored.get(k), v)}


def stored_anomalies(result: dict[str, Any]) -> set[tuple[Any, ...]]:
    return {
        (
            a["kind"],
            UUID(a["contract_id"]) if a["contract_id"] else None,
            UUID(a["user_id"]) if a["user_id"] else None,
            a["occurrences"],
            cents(Decimal(str(a["hours"]))),
            D.fromisoformat(a["first_date"]),
            D.fromisoformat(a["last_date"]),
        )
        for a in result["anomalies"]
    }


# ---------------------------------------------------------------------------
# running analyses


def worker(dsn: str, cfo: CFOAnalysis) -> Worker:
    """A worker for `cfo.analyze` only, with the queue tests' short timings."""
    options: dict[str, Any] = {**FAST, "handle_signals": False, "pool_size": 4}
    return Worker(dsn, {KIND: cfo}, **options)


def handler(report_attempts: int = 3, **model_options: Any) -> CFOAnalysis:
    return CFOAnalysis(offline_model(**model_options), model_name="offline",
                       report_attempts=report_attempts, today=lambda: TODAY)


async def analyse(
    dsn: str,
    conn: asyncpg.Connection,
    workspace: UUID,
    user: UUID,
    payload: dict[str, Any] | None = None,
    *,
    cfo: CFOAnalysis | None = None,
    max_attempts: int | None = None,
) -> dict[str, Any]:
    """Enqueue one `cfo.analyze` job, run a worker until nothing is due, return the job's row."""
    job = await queue.enqueue(conn, KIND, PERIOD if payload is None else payload,
                              workspace_id=workspace, user_id=user, max_attempts=max_attempts)
    await worker(dsn, cfo or handler()).run_until_drained()
    row = await conn.fetchrow(
        "select id, status, attempts, error, result::text as result, progress::text as progress, "
        "usage::text as usage from public.jobs where id = $1",
        job.id,
    )
    assert row is not None
    out = dict(row)
    for key in ("result", "progress", "usage"):
        out[key] = None if out[key] is None else json.loads(out[key])
    return out


async def actions_of(conn: asyncpg.Connection, job_id: UUID | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "select id, workspace_id, job_id, type, title, reason, contract_id, payload::text as payload, "
        "metadata::text as metadata, status, decided_by, decided_at from public.ai_actions "
        "where $1::uuid is null or job_id = $1 order by created_at, id",
        job_id,
    )
    return [{**r, "payload": json.loads(r["payload"]), "metadata": json.loads(r["metadata"])} for r in rows]
