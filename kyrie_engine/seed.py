"""Sample data: the demo's studio, and the benchmark's big workspace.

`seed_studio` writes a small, realistic workspace (six contracts across
three currencies, a quarter of worklogs) in which each of the CFO's action
types has a reason to fire: a contract heading over budget, a fixed fee
already over it (its effective rate below the hourly ones), unbilled time,
a contract past its end date still marked active, an active contract nobody
logged time on, long days, blank descriptions and entries outside a
contract's dates.  Dates are relative to `today`, so the default analysis
period (the last 90 days) always covers the story.  It is deterministic: the
same `today` gives the same rows.

`seed_volume` generates N contracts and M worklogs set-based in SQL, for
`kyrie-engine bench`.

Both insert as the connection's role (the owner, no RLS): seeding is an
administrator's act, not a user's.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg


@dataclass
class SeededWorkspace:
    workspace_id: UUID
    owner_id: UUID
    member_ids: list[UUID]
    contracts: dict[str, UUID] = field(default_factory=dict)  # title -> id
    worklogs: int = 0


@dataclass(frozen=True)
class _Contract:
    client: str
    title: str
    billing: str
    rate_or_fee: Decimal
    currency: str
    budget: Decimal | None
    starts: int  # days before today
    ends: int | None  # days after today (negative: already ended)
    status: str = "active"
    hours_per_day: float = 0.0  # average on the weekdays someone works on it
    workdays: float = 0.0  # share of weekdays with an entry
    invoiced_before: int | None = None  # entries older than this many days are invoiced
    notes: tuple[str, ...] = ()


_STUDIO: tuple[_Contract, ...] = (
    _Contract(
        "Acme Corp",
        "Website redesign",
        "hourly",
        Decimal("120"),
        "USD",
        Decimal("300"),
        150,
        45,
        hours_per_day=2.6,
        workdays=0.95,
        invoiced_before=45,
        notes=(
            "Homepage layout and hero section",
            "Design review with Acme marketing",
            "Checkout flow wireframes",
            "Accessibility fixes on forms",
            "CMS migration scripts",
            "Performance pass: images and fonts",
        ),
    ),
    _Contract(
        "Globex",
        "Mobile app MVP",
        "fixed",
        Decimal("24000"),
        "USD",
        Decimal("200"),
        100,
        30,
        hours_per_day=3.4,
        workdays=0.98,
        invoiced_before=60,
        notes=(
            "Onboarding screens",
            "Push notification service",
            "Offline sync edge cases",
            "App store submission prep",
            "Bug bash with Globex QA",
            "Scope change: loyalty card",
        ),
    ),
    _Contract(
        "Initech",
        "Support retainer",
        "hourly",
        Decimal("95"),
        "EUR",
        Decimal("200"),
        200,
        None,
        hours_per_day=1.2,
        workdays=0.6,
        invoiced_before=30,
        notes=("Server patching", "Ticket triage", "Backup restore test", "TPS report export fix"),
    ),
    _Contract(
        "Umbrella",
        "Brand identity",
        "fixed",
        Decimal("8000"),
        "GBP",
        Decimal("80"),
        75,
        -10,
        hours_per_day=1.6,
        workdays=0.85,
        notes=("Logo explorations", "Typography pairing", "Brand guidelines PDF", "Stationery set"),
    ),
    _Contract(
        "Hooli", "Data pipeline audit", "hourly", Decimal("150"), "USD", Decimal("40"), 20, 40, notes=()
    ),
    _Contract(
        "Stark Industries",
        "Internal tooling",
        "hourly",
        Decimal("110"),
        "USD",
        None,
        300,
        -100,
        status="completed",
        notes=(),
    ),
)


async def _user(conn: asyncpg.Connection, email: str) -> UUID:
    """The user with this email, created if missing.

    Written without ON CONFLICT (email): Supabase's auth.users has only a
    partial unique index on email, which ON CONFLICT cannot name, and no
    default for id (GoTrue assigns it), so the demo also seeds a real project.
    """
    return await conn.fetchval(
        """
        with existing as (select id from auth.users where email = $1 limit 1),
             created as (
               insert into auth.users (id, email)
               select gen_random_uuid(), $1 where not exists (select from existing)
               returning id
             )
        select id from existing union all select id from created
        """,
        email,
    )


async def seed_studio(
    conn: asyncpg.Connection, today: dt.date, *, name: str = "Northwind Studio"
) -> SeededWorkspace:
    """The demo's workspace; see the module docstring."""
    rng = random.Random(7)  # noqa: S311 - repeatable demo data, not a secret
    owner = await _user(conn, "maya@northwind.example")
    members = [await _user(conn, "leo@northwind.example"), await _user(conn, "sam@northwind.example")]
    workspace = await conn.fetchval(
        "insert into public.workspaces (name, created_by) values ($1, $2) returning id", name, owner
    )
    for member in members:
        await conn.execute(
            "insert into public.workspace_members (workspace_id, user_id, role) values ($1, $2, 'member')",
            workspace,
            member,
        )
    seeded = SeededWorkspace(workspace, owner, members)
    people = [owner, *members]

    rows: list[tuple[Any, ...]] = []
    for c in _STUDIO:
        start = today - dt.timedelta(days=c.starts)
        end = None if c.ends is None else today + dt.timedelta(days=c.ends)
        contract = await conn.fetchval(
            """
            insert into public.contracts (workspace_id, client_name, title, billing_type, hourly_rate, fixed_fee,
                                          currency, budget_hours, start_date, end_date, status, created_by)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            returning id
            """,
            workspace,
            c.client,
            c.title,
            c.billing,
            c.rate_or_fee if c.billing == "hourly" else None,
            c.rate_or_fee if c.billing == "fixed" else None,
            c.currency,
            c.budget,
            start,
            end,
            c.status,
            owner,
        )
        seeded.contracts[c.title] = contract
        day = start
        while day <= min(today, end or today) and c.hours_per_day:
            if day.weekday() < 5 and rng.random() < c.workdays:
                hours = Decimal(str(max(0.5, round(rng.gauss(c.hours_per_day, 0.8) * 4) / 4)))
                age = (today - day).days
                invoiced = c.invoiced_before is not None and age > c.invoiced_before
                rows.append(
                    (workspace, contract, rng.choice(people), day, hours, rng.choice(c.notes), True, invoiced)
                )
            day += dt.timedelta(days=1)

    acme, globex, umbrella = (
        seeded.contracts[t] for t in ("Website redesign", "Mobile app MVP", "Brand identity")
    )
    crunch = today - dt.timedelta(days=12)
    while crunch.weekday() >= 5:
        crunch -= dt.timedelta(days=1)
    rows += [
        # A 14-hour day before a Globex demo.
        (workspace, acme, members[0], crunch, Decimal("8.5"), "Launch checklist", True, False),
        (workspace, globex, members[0], crunch, Decimal("5.5"), "Demo build for Globex board", True, False),
        # Entries nobody described.
        (workspace, globex, members[1], today - dt.timedelta(days=20), Decimal("3"), "", True, False),
        (workspace, globex, members[1], today - dt.timedelta(days=19), Decimal("2.5"), "", True, False),
        (workspace, acme, members[1], today - dt.timedelta(days=5), Decimal("1.5"), " ", False, False),
        # Work logged on Umbrella after it ended.
        (
            workspace,
            umbrella,
            owner,
            today - dt.timedelta(days=6),
            Decimal("2"),
            "Extra logo variants",
            True,
            False,
        ),
        (
            workspace,
            umbrella,
            owner,
            today - dt.timedelta(days=3),
            Decimal("1.5"),
            "Print proofs",
            True,
            False,
        ),
    ]
    await conn.copy_records_to_table(
        "worklogs",
        schema_name="public",
        records=rows,
        columns=[
            "workspace_id",
            "contract_id",
            "user_id",
            "work_date",
            "hours",
            "description",
            "billable",
            "invoiced",
        ],
    )
    seeded.worklogs = len(rows)
    return seeded


# ---------------------------------------------------------------------------
# volume, for the benchmark

_VOLUME_CONTRACTS = """
insert into public.contracts (workspace_id, client_name, title, billing_type, hourly_rate, fixed_fee, currency,
                              budget_hours, start_date, end_date, status)
select $1, 'Client ' || lpad(g::text, 3, '0'), 'Project ' || lpad(g::text, 3, '0'),
       case when g % 3 = 0 then 'fixed' else 'hourly' end,
       case when g % 3 = 0 then null else 80 + (g % 7) * 10 end,
       case when g % 3 = 0 then 20000 + g * 500 end,
       (array['USD', 'EUR', 'GBP'])[1 + g % 3],
       case when g % 5 = 0 then null else 300 + (g % 9) * 60 end,
       $2::date - 200 + g,
       case when g % 4 = 0 then $2::date + 30 + g end,
       'active'
from generate_series(1, $3) g
"""

# Worklog n goes to contract n mod N, on one of the last 180 days, by one of
# the workspace's people; every 97th has no description, every 10th is not
# billable, and billable work older than 45 days is invoiced.
_VOLUME_WORKLOGS = """
with c as (select array_agg(id order by title) as ids from public.contracts where workspace_id = $1),
     u as (select array_agg(user_id order by user_id) as ids from public.workspace_members where workspace_id = $1)
insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours, description, billable, invoiced)
select $1,
       c.ids[1 + n % cardinality(c.ids)],
       u.ids[1 + (n / 7) % cardinality(u.ids)],
       $2::date - (n * 7919 % 180)::int,
       0.25 + (n * 104729 % 32) * 0.25,
       case when n % 97 = 0 then '' else 'Task ' || n || ': implementation and review' end,
       n % 10 <> 0,
       n % 10 <> 0 and (n * 7919 % 180) > 45
from generate_series(1, $3::bigint) n, c, u
"""


async def seed_volume(
    conn: asyncpg.Connection,
    today: dt.date,
    *,
    contracts: int = 50,
    worklogs: int = 200_000,
    people: int = 10,
) -> SeededWorkspace:
    owner = await _user(conn, "owner@volume.example")
    workspace = await conn.fetchval(
        "insert into public.workspaces (name, created_by) values ('Volume Studio', $1) returning id", owner
    )
    members = [await _user(conn, f"person{i}@volume.example") for i in range(1, people)]
    await conn.executemany(
        "insert into public.workspace_members (workspace_id, user_id, role) values ($1, $2, 'member')",
        [(workspace, m) for m in members],
    )
    await conn.execute(_VOLUME_CONTRACTS, workspace, today, contracts)
    await conn.execute(_VOLUME_WORKLOGS, workspace, today, worklogs)
    await conn.execute("analyze public.contracts, public.worklogs")
    seeded = SeededWorkspace(workspace, owner, members, worklogs=worklogs)
    for row in await conn.fetch("select id, title from public.contracts where workspace_id = $1", workspace):
        seeded.contracts[row["title"]] = row["id"]
    return seeded
