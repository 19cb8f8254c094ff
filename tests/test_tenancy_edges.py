"""Edges of tenancy found in review: ownerless races, deleted accounts, absurd budgets."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg
from support import add_member, add_worklog, new_contract, new_user, new_workspace

from kyrie_engine.db import acting_as

REMOVE = "delete from public.workspace_members where workspace_id = $1 and user_id = $2"


async def test_two_owners_removing_each_other_leave_one(db: asyncpg.Connection, db_dsn: str) -> None:
    a, b = await new_user(db), await new_user(db)
    workspace = await new_workspace(db, a)
    await add_member(db, workspace, b, "owner")
    first, second = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        async with acting_as(first, a):
            await first.execute(REMOVE, workspace, b)
            # The second removal now waits for the workspace row's lock held by the first.
            racing = asyncio.create_task(_remove_as(second, b, workspace, a))
            await asyncio.sleep(0.3)
            assert not racing.done()
        outcome = await racing
    finally:
        await first.close()
        await second.close()
    assert outcome == "KY010"
    owners = await db.fetch("select user_id from public.workspace_members where workspace_id = $1", workspace)
    assert [r["user_id"] for r in owners] == [a]


async def _remove_as(
    conn: asyncpg.Connection, actor: uuid.UUID, workspace: uuid.UUID, target: uuid.UUID
) -> str:
    try:
        async with acting_as(conn, actor):
            await conn.execute(REMOVE, workspace, target)
    except asyncpg.PostgresError as error:
        return str(error.sqlstate)
    return "ok"


async def test_deleting_the_creators_account_keeps_the_workspace(db: asyncpg.Connection) -> None:
    creator, heir = await new_user(db), await new_user(db)
    workspace = await new_workspace(db, creator)
    await add_member(db, workspace, heir, "owner")
    contract = await new_contract(db, workspace)
    async with acting_as(db, heir):
        await db.execute(REMOVE, workspace, creator)
    await db.execute("delete from auth.users where id = $1", creator)
    row = await db.fetchrow("select created_by from public.workspaces where id = $1", workspace)
    assert row is not None and row["created_by"] is None
    assert await db.fetchval("select count(*) from public.contracts where id = $1", contract) == 1
    async with acting_as(db, heir):
        assert await db.fetchval("select count(*) from public.workspaces where id = $1", workspace) == 1


async def test_an_absurd_budget_does_not_break_the_figures(db: asyncpg.Connection) -> None:
    """A member may type any budget; the run-out projection must not overflow."""
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    contract = await new_contract(db, workspace, budget_hours=Decimal("99999999"))
    await add_worklog(db, contract, owner, hours=Decimal("0.25"), work_date=dt.date(2026, 11, 20))
    async with acting_as(db, owner):
        row = await db.fetchrow(
            "select budget_exhausted_on"
            " from kyrie.contract_figures($1, date '2026-09-01', date '2026-11-25')",
            workspace,
        )
        await db.fetch("select * from kyrie.currency_totals($1)", workspace)
    assert row["budget_exhausted_on"] is None
