"""kyrie.worklog_cells, the rollup kyrie.cfo_figures reads, is always the worklogs summed.

The cells are kept by statement triggers on public.worklogs
(kyrie_engine/sql/20261201000802_worklog_cells.sql).  Every test writes
worklogs one way or another and then compares the cells with the same sums
computed here from the worklogs themselves: after single and multi-row
inserts and COPY, updates of each column a cell is keyed or summed by (and
of none), deletes, a contract's and a workspace's cascades, and TRUNCATE.
Cells are under RLS exactly like the worklogs they sum.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from support import add_member, add_worklog, new_contract, new_user, new_workspace

from kyrie_engine.db import acting_as

D = dt.date

_FROM_WORKLOGS = """
select workspace_id, contract_id, user_id, work_date, billable, invoiced,
       btrim(description) = '' as blank, count(*)::int as entries, sum(hours) as hours
from public.worklogs
group by 1, 2, 3, 4, 5, 6, 7
order by 1, 2, 3, 4, 5, 6, 7
"""

_CELLS = """
select workspace_id, contract_id, user_id, work_date, billable, invoiced, blank, entries, hours
from kyrie.worklog_cells
order by 1, 2, 3, 4, 5, 6, 7
"""


async def assert_cells_match(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    cells = await conn.fetch(_CELLS)
    assert [tuple(r) for r in cells] == [tuple(r) for r in await conn.fetch(_FROM_WORKLOGS)]
    assert all(r["entries"] > 0 for r in cells)  # an emptied cell is removed, not left at zero
    return cells


async def studio(conn: asyncpg.Connection) -> dict[str, Any]:
    owner = await new_user(conn)
    member = await new_user(conn)
    ws = await new_workspace(conn, owner)
    await add_member(conn, ws, member, "member")
    web = await new_contract(conn, ws, title="Website")
    app = await new_contract(conn, ws, title="App", billing_type="fixed", fixed_fee=Decimal("5000"))
    rows = [
        (web, owner, "2", D(2026, 2, 2), "Homepage", True, False),
        (web, owner, "3.25", D(2026, 2, 2), "Homepage again", True, True),
        (web, member, "1", D(2026, 2, 2), "", False, False),
        (app, member, "8", D(2026, 2, 3), " ", True, False),
        (app, owner, "4.5", D(2026, 2, 4), "Sync", True, True),
    ]
    await conn.executemany(
        "insert into public.worklogs (workspace_id, contract_id, user_id, hours, work_date, description, "
        "billable, invoiced) values ($1, $2, $3, $4, $5, $6, $7, $8)",
        [(ws, c, u, Decimal(h), *rest) for c, u, h, *rest in rows],
    )
    return {"ws": ws, "owner": owner, "member": member, "web": web, "app": app}


async def test_inserts_one_by_one_in_bulk_and_by_copy_are_counted(db: asyncpg.Connection) -> None:
    s = await studio(db)
    await assert_cells_match(db)
    await db.execute(
        "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours, description) "
        "select $1, $2, $3, date '2026-02-01' + g % 5, 0.25 * (1 + g % 8), case when g % 3 = 0 then '' "
        "else 'bulk' end from generate_series(1, 500) g",
        s["ws"], s["web"], s["member"],
    )
    await db.copy_records_to_table(
        "worklogs", schema_name="public",
        records=[(s["ws"], s["app"], s["owner"], D(2026, 2, 4), Decimal("1.5"), "copied")] * 3,
        columns=["workspace_id", "contract_id", "user_id", "work_date", "hours", "description"],
    )
    cells = await assert_cells_match(db)
    assert sum(r["entries"] for r in cells) == 5 + 500 + 3


@pytest.mark.parametrize(
    "change",
    [
        "hours = hours + 1",
        "work_date = work_date + 1",
        "description = ''",
        "description = 'now described'",
        "billable = false, invoiced = false",
        "invoiced = billable",
        "user_id = {member}",
        "contract_id = {app}",
        "updated_at = now()",  # a cell's columns unchanged: nothing to apply
    ],
)
async def test_updates_move_entries_between_cells(db: asyncpg.Connection, change: str) -> None:
    s = await studio(db)
    change = change.format(member=f"'{s['member']}'", app=f"'{s['app']}'")
    await db.execute(f"update public.worklogs set {change} where contract_id = $1", s["web"])
    await assert_cells_match(db)
    await db.execute(f"update public.worklogs set {change} where hours > 3")
    await assert_cells_match(db)


async def test_deletes_and_cascades_empty_their_cells(db: asyncpg.Connection) -> None:
    s = await studio(db)
    other = await studio(db)
    await db.execute("delete from public.worklogs where hours = 2")
    await assert_cells_match(db)
    await db.execute("delete from public.contracts where id = $1", s["web"])
    await assert_cells_match(db)
    await db.execute("delete from public.workspaces where id = $1", s["ws"])
    cells = await assert_cells_match(db)
    assert {r["workspace_id"] for r in cells} == {other["ws"]}
    await db.execute("truncate public.worklogs")
    assert await assert_cells_match(db) == []


async def test_a_rolled_back_write_leaves_the_cells_as_they_were(db: asyncpg.Connection) -> None:
    s = await studio(db)
    before = await assert_cells_match(db)
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await add_worklog(db, s["web"], s["owner"], hours=Decimal("7"))
            await db.execute("update public.worklogs set hours = 25")  # hours <= 24: the statement fails
    assert await assert_cells_match(db) == before


async def test_members_write_through_rls_and_see_only_their_workspaces_cells(db: asyncpg.Connection) -> None:
    a, b = await studio(db), await studio(db)

    async def as_user(user: UUID, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        async with acting_as(db, user):
            return await work(db)

    # A member's own writes, as PostgREST would make them, keep the cells (SECURITY DEFINER trigger).
    await as_user(a["member"], lambda c: c.execute(
        "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours) "
        "values ($1, $2, $3, '2026-02-09', 6)", a["ws"], a["web"], a["member"]))
    await as_user(a["member"], lambda c: c.execute(
        "update public.worklogs set hours = 1 where work_date = '2026-02-02'"))
    await assert_cells_match(db)

    seen = await as_user(
        a["member"], lambda c: c.fetch("select distinct workspace_id from kyrie.worklog_cells")
    )
    assert [r["workspace_id"] for r in seen] == [a["ws"]]
    assert b["ws"] != a["ws"]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_user(a["member"], lambda c: c.execute("delete from kyrie.worklog_cells"))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_user(None, lambda c: c.fetch("select * from kyrie.worklog_cells"))  # type: ignore[arg-type]


async def test_cells_are_policed_exactly_like_the_worklogs(db: asyncpg.Connection) -> None:
    """If the worklogs' read policy changes, the cells' must change with it (or an analysis
    would count what the user may not read): this fails until both say the same."""
    policies = await db.fetch(
        "select tablename, roles::text[] as roles, qual from pg_policies "
        "where (schemaname, tablename) in (('public', 'worklogs'), ('kyrie', 'worklog_cells')) "
        "and cmd = 'SELECT'"
    )
    by_table = {p["tablename"]: (p["roles"], p["qual"]) for p in policies}
    assert set(by_table) == {"worklogs", "worklog_cells"}
    assert by_table["worklog_cells"] == by_table["worklogs"]
