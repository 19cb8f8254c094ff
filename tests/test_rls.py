"""The RLS matrix: who may select, insert, update and delete what, as data.

Every case is one statement run by one actor through `acting_as` (the same
SET LOCAL ROLE + request.jwt.claims as PostgREST) against one shared world,
and always rolled back, so cases cannot see each other's writes.  The world
lives in a database of this module's own (copied from the migrated template
once), because ~150 cases each copying a database would cost more than the
cases themselves.

Outcomes:
  * an int: rows visible (select count(*)) or rows affected (insert/update/delete);
    0 on a write means "the policy's USING hid the row": PostgreSQL skips it silently;
  * a SQLSTATE: DENIED (42501) is a missing grant or a failed WITH CHECK;
    KY010 is the keep-an-owner trigger.

Actors: anon; `stranger` (signed in, owner of workspace B, nothing in A);
`member`, `admin`, `owner` of workspace A.  `member2` is a second plain
member of A (whose worklog `member` must not touch), `outsider` a signed-up
user in no workspace (the one invited/added in member cases).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest
from support import add_member, add_worklog, new_contract, new_user, new_workspace

from kyrie_engine.db import acting_as

DENIED = "42501"
OWNER_KEPT = "KY010"
ACTORS = ("anon", "stranger", "member", "admin", "owner")


@dataclass(frozen=True)
class Case:
    table: str
    op: str
    actor: str
    sql: str
    expect: int | str
    label: str = ""

    @property
    def id(self) -> str:
        return "-".join(p for p in (self.table, self.op, self.actor, self.label) if p)


def row(table: str, op: str, sql: str, *expects: int | str, label: str = "") -> list[Case]:
    """One statement, one expectation per actor in ACTORS order."""
    assert len(expects) == len(ACTORS)
    return [Case(table, op, actor, sql, expect, label) for actor, expect in zip(ACTORS, expects, strict=True)]


def only(table: str, op: str, actor: str, sql: str, expect: int | str, label: str) -> list[Case]:
    """A case that pins one decision for one actor."""
    return [Case(table, op, actor, sql, expect, label)]


D = DENIED
ADD_MEMBER = "insert into public.workspace_members (workspace_id, user_id, role) values "
SET_ROLE = "update public.workspace_members set role = "
# Statements name world ids as {ws_a}, {me}, ...; they are substituted as $n parameters.
MATRIX: list[Case] = [
    # --- workspaces: any member renames, only the creator deletes, anyone signed in creates their own.
    *row("workspaces", "select", "select count(*) from public.workspaces where id = {ws_a}", D, 0, 1, 1, 1),
    *row("workspaces", "insert", "insert into public.workspaces (name, created_by) values ('New', {me})",
         D, 1, 1, 1, 1),
    *only("workspaces", "insert", "member",
          "insert into public.workspaces (name, created_by) values ('New', {owner})", D, "for-someone-else"),
    *row("workspaces", "update", "update public.workspaces set name = 'Renamed' where id = {ws_a}",
         D, 0, 1, 1, 1),
    *only("workspaces", "update", "owner",
          "update public.workspaces set created_by = {member} where id = {ws_a}", D, "created_by"),
    *row("workspaces", "delete", "delete from public.workspaces where id = {ws_a}", D, 0, 0, 0, 1),
    # --- workspace_members: admins manage members, only owners touch owners, non-owners may leave.
    *row("workspace_members", "select",
         "select count(*) from public.workspace_members where workspace_id = {ws_a}", D, 0, 4, 4, 4),
    *row("workspace_members", "insert",
         ADD_MEMBER + "({ws_a}, {outsider}, 'member')",
         D, D, D, 1, 1),
    *only("workspace_members", "insert", "admin",
          ADD_MEMBER + "({ws_a}, {outsider}, 'owner')",
          D, "add-owner"),
    *only("workspace_members", "insert", "owner",
          ADD_MEMBER + "({ws_a}, {outsider}, 'owner')",
          1, "add-owner"),
    *only("workspace_members", "insert", "stranger",
          ADD_MEMBER + "({ws_a}, {me}, 'owner')",
          D, "join-self"),
    *only("workspace_members", "insert", "admin",
          ADD_MEMBER + "({ws_b}, {me}, 'member')",
          D, "join-other-workspace"),
    *row("workspace_members", "update",
         SET_ROLE + "'admin' where workspace_id = {ws_a} and user_id = {member2}",
         D, 0, 0, 1, 1),
    *only("workspace_members", "update", "member",
          SET_ROLE + "'admin' where workspace_id = {ws_a} and user_id = {me}",
          0, "promote-self"),
    *only("workspace_members", "update", "admin",
          SET_ROLE + "'owner' where workspace_id = {ws_a} and user_id = {member}",
          D, "make-owner"),
    *only("workspace_members", "update", "owner",
          SET_ROLE + "'owner' where workspace_id = {ws_a} and user_id = {member}",
          1, "make-owner"),
    *only("workspace_members", "update", "admin",
          SET_ROLE + "'member' where workspace_id = {ws_a} and user_id = {owner}",
          0, "demote-owner"),
    *only("workspace_members", "update", "owner",
          SET_ROLE + "'admin' where workspace_id = {ws_a} and user_id = {me}",
          OWNER_KEPT, "demote-last-owner"),
    *only("workspace_members", "update", "owner",
          "update public.workspace_members set user_id = {outsider} where workspace_id = {ws_a} "
          "and user_id = {member}", D, "user_id"),
    *row("workspace_members", "delete",
         "delete from public.workspace_members where workspace_id = {ws_a} and user_id = {member2}",
         D, 0, 0, 1, 1),
    *row("workspace_members", "delete",
         "delete from public.workspace_members where workspace_id = {ws_a} and user_id = {me}",
         D, 0, 1, 1, OWNER_KEPT, label="leave"),
    *only("workspace_members", "delete", "admin",
          "delete from public.workspace_members where workspace_id = {ws_a} and user_id = {owner}",
          0, "remove-owner"),
    # --- invites: no direct access for anybody; only the invite functions touch the table.
    *row("invites", "select", "select count(*) from public.invites", D, D, D, D, D),
    *row("invites", "insert",
         "insert into public.invites (workspace_id, token_hash, expires_at, created_by) "
         "values ({ws_a}, sha256('x'::bytea), now() + interval '1 day', {owner})", D, D, D, D, D),
    *row("invites", "update", "update public.invites set role = 'admin'", D, D, D, D, D),
    *row("invites", "delete", "delete from public.invites", D, D, D, D, D),
    # --- contracts: members create and edit, only owners and admins delete.
    *row("contracts", "select", "select count(*) from public.contracts where workspace_id = {ws_a}",
         D, 0, 1, 1, 1),
    *row("contracts", "insert",
         "insert into public.contracts (workspace_id, client_name, title, billing_type, fixed_fee, "
         "start_date) values ({ws_a}, 'Acme', 'Logo', 'fixed', 500, date '2026-01-01')", D, D, 1, 1, 1),
    *row("contracts", "update", "update public.contracts set title = 'Renamed' where id = {contract_a}",
         D, 0, 1, 1, 1),
    *only("contracts", "update", "owner",
          "update public.contracts set workspace_id = {ws_b} where id = {contract_a}", D, "move-workspace"),
    *row("contracts", "delete", "delete from public.contracts where id = {contract_a}", D, 0, 0, 1, 1),
    # --- worklogs: members log their own time; owners and admins correct anybody's.
    *row("worklogs", "select", "select count(*) from public.worklogs where workspace_id = {ws_a}",
         D, 0, 2, 2, 2),
    *row("worklogs", "insert",
         "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours) "
         "values ({ws_a}, {contract_a}, {me}, date '2026-02-03', 1)", D, D, 1, 1, 1),
    *only("worklogs", "insert", "member",
          "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours) "
          "values ({ws_a}, {contract_a}, {member2}, date '2026-02-03', 1)", D, "for-someone-else"),
    *only("worklogs", "insert", "admin",
          "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours) "
          "values ({ws_a}, {contract_a}, {member2}, date '2026-02-03', 1)", D, "for-someone-else"),
    *only("worklogs", "insert", "member",
          "insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours) "
          "values ({ws_b}, {contract_b}, {me}, date '2026-02-03', 1)", D, "into-other-workspace"),
    *row("worklogs", "update", "update public.worklogs set hours = 3 where id = {worklog_member}",
         D, 0, 1, 1, 1),
    *only("worklogs", "update", "member",
          "update public.worklogs set hours = 3 where id = {worklog_member2}", 0, "someone-elses"),
    *only("worklogs", "update", "member",
          "update public.worklogs set user_id = {member2} where id = {worklog_member}", D, "user_id"),
    *only("worklogs", "update", "owner",
          "update public.worklogs set workspace_id = {ws_b} where id = {worklog_member}", D, "workspace_id"),
    *row("worklogs", "delete", "delete from public.worklogs where id = {worklog_member}", D, 0, 1, 1, 1),
    *only("worklogs", "delete", "member",
          "delete from public.worklogs where id = {worklog_member2}", 0, "someone-elses"),
    # --- jobs: members read their workspace's; only the engine (table owner) writes.
    *row("jobs", "select", "select count(*) from public.jobs where workspace_id = {ws_a}", D, 0, 1, 1, 1),
    *row("jobs", "insert", "insert into public.jobs (workspace_id, kind) values ({ws_a}, 'cfo.analyze')",
         D, D, D, D, D),
    *row("jobs", "update", "update public.jobs set status = 'cancelled' where id = {job_a}", D, D, D, D, D),
    *row("jobs", "delete", "delete from public.jobs where id = {job_a}", D, D, D, D, D),
    # --- ai_actions: members read, and accept/dismiss (the status column only); the engine writes.
    *row("ai_actions", "select", "select count(*) from public.ai_actions where workspace_id = {ws_a}",
         D, 0, 1, 1, 1),
    *row("ai_actions", "insert",
         "insert into public.ai_actions (workspace_id, job_id, type, title, reason) "
         "values ({ws_a}, {job_a}, 'send_invoice', 'Invoice', 'Because')", D, D, D, D, D),
    *row("ai_actions", "update", "update public.ai_actions set status = 'accepted' where id = {action_a}",
         D, 0, 1, 1, 1),
    *only("ai_actions", "update", "owner",
          "update public.ai_actions set title = 'Changed' where id = {action_a}", D, "other-column"),
    *row("ai_actions", "delete", "delete from public.ai_actions where id = {action_a}", D, D, D, D, D),
]


@dataclass
class World:
    dsn: str
    ids: dict[str, uuid.UUID]


async def _seed(dsn: str) -> dict[str, uuid.UUID]:
    conn = await asyncpg.connect(dsn)
    try:
        ids: dict[str, uuid.UUID] = {}
        for name in ("owner", "admin", "member", "member2", "stranger", "outsider"):
            ids[name] = await new_user(conn, f"{name}@example.test")
        ids["ws_a"] = await new_workspace(conn, ids["owner"], "A")
        ids["ws_b"] = await new_workspace(conn, ids["stranger"], "B")
        await add_member(conn, ids["ws_a"], ids["admin"], "admin")
        await add_member(conn, ids["ws_a"], ids["member"], "member")
        await add_member(conn, ids["ws_a"], ids["member2"], "member")
        for ws in ("a", "b"):
            workspace = ids[f"ws_{ws}"]
            ids[f"contract_{ws}"] = await new_contract(conn, workspace)
            ids[f"job_{ws}"] = await conn.fetchval(
                "insert into public.jobs (workspace_id, kind) values ($1, 'cfo.analyze') returning id",
                workspace,
            )
            ids[f"action_{ws}"] = await conn.fetchval(
                "insert into public.ai_actions (workspace_id, job_id, type, title, reason) "
                "values ($1, $2, 'send_invoice', 'Invoice', 'Because') returning id",
                workspace, ids[f"job_{ws}"],
            )
            await conn.execute(
                "insert into public.invites (workspace_id, token_hash, expires_at, created_by) "
                "values ($1, sha256($2::bytea), now() + interval '1 day', $3)",
                workspace, ws.encode(), ids["owner"] if ws == "a" else ids["stranger"],
            )
        ids["worklog_member"] = await add_worklog(conn, ids["contract_a"], ids["member"])
        ids["worklog_member2"] = await add_worklog(conn, ids["contract_a"], ids["member2"])
        ids["worklog_b"] = await add_worklog(conn, ids["contract_b"], ids["stranger"])
        return ids
    finally:
        await conn.close()


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def world(pg_server, template_db: str) -> Iterator[World]:  # pg_server: conftest's Server
    name = f"kyrie_rls_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_server.admin_dsn, f'create database "{name}" template "{template_db}"'))
    dsn = pg_server.dsn_for(name)
    try:
        yield World(dsn, asyncio.run(_seed(dsn)))
    finally:
        asyncio.run(_admin(pg_server.admin_dsn, f'drop database if exists "{name}" with (force)'))


@pytest.fixture
async def conn(world: World) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(world.dsn)
    yield connection
    await connection.close()


class _Rollback(Exception):
    """Raised inside acting_as so every case's transaction rolls back, success or not."""


def bind(sql: str, ids: dict[str, uuid.UUID], me: uuid.UUID | None) -> tuple[str, list[uuid.UUID | None]]:
    """Turn {name} placeholders into $n parameters (so no id is ever spliced into SQL text)."""
    names: list[str] = []

    class Numbered(dict[str, str]):
        def __missing__(self, key: str) -> str:
            if key not in names:
                names.append(key)
            return f"${names.index(key) + 1}::uuid"

    text = sql.format_map(Numbered())
    values = {**ids, "me": me}
    return text, [values[n] for n in names]


async def outcome(conn: asyncpg.Connection, ids: dict[str, uuid.UUID], actor: str, op: str,
                  sql: str) -> int | str:
    user = None if actor == "anon" else ids[actor]
    text, args = bind(sql, ids, user)
    result: int | str = -1
    try:
        async with acting_as(conn, user, email=None if user is None else f"{actor}@example.test"):
            if op == "select":
                result = await conn.fetchval(text, *args)
            else:
                result = int((await conn.execute(text, *args)).split()[-1])
            raise _Rollback
    except _Rollback:
        return result
    except asyncpg.PostgresError as error:
        return str(error.sqlstate)


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
async def test_rls_matrix(conn: asyncpg.Connection, world: World, case: Case) -> None:
    got = await outcome(conn, world.ids, case.actor, case.op, case.sql)
    assert got == case.expect, f"{case.id}: {case.sql}"


def test_matrix_covers_every_table_op_and_actor() -> None:
    """The matrix is the spec: a table, command or actor missing from it is a hole."""
    covered = {(c.table, c.op, c.actor) for c in MATRIX}
    tables = ("workspaces", "workspace_members", "invites", "contracts", "worklogs", "jobs", "ai_actions")
    missing = [(t, o, a) for t in tables for o in ("select", "insert", "update", "delete") for a in ACTORS
               if (t, o, a) not in covered]
    assert missing == []


async def test_matrix_covers_every_public_table(conn: asyncpg.Connection) -> None:
    tables = await conn.fetch(
        "select c.relname from pg_class c "
        "where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')"
    )
    assert {r["relname"] for r in tables} <= {c.table for c in MATRIX}


CROSS_TENANT = {
    "workspaces": "id", "workspace_members": "workspace_id", "contracts": "workspace_id",
    "worklogs": "workspace_id", "jobs": "workspace_id", "ai_actions": "workspace_id",
}


@pytest.mark.parametrize("actor", ["member", "admin", "owner"])
async def test_member_of_a_sees_nothing_of_b(conn: asyncpg.Connection, world: World, actor: str) -> None:
    """Not B's rows by id, and not through an unfiltered read either (every row seen is A's)."""
    ids = world.ids
    async with acting_as(conn, ids[actor], readonly=True):
        for table, column in CROSS_TENANT.items():
            count = f"select count(*) from public.{table} where {column}"
            of_b = await conn.fetchval(f"{count} = $1", ids["ws_b"])
            foreign = await conn.fetchval(f"{count} <> $1", ids["ws_a"])
            assert (table, of_b, foreign) == (table, 0, 0)
        # Known ids of B's rows, asked for directly.
        for table, key in (("contracts", "contract_b"), ("worklogs", "worklog_b"), ("jobs", "job_b"),
                           ("ai_actions", "action_b")):
            assert await conn.fetchval(f"select count(*) from public.{table} where id = $1", ids[key]) == 0


async def test_member_cannot_write_into_b(conn: asyncpg.Connection, world: World) -> None:
    """Writes aimed at B's rows by id hit nothing (USING hides them), so B is unchanged."""
    ids = world.ids
    statements = [
        ("update public.workspaces set name = 'pwned' where id = $1", "ws_b"),
        ("update public.contracts set title = 'pwned' where id = $1", "contract_b"),
        ("update public.worklogs set hours = 24 where id = $1", "worklog_b"),
        ("update public.ai_actions set status = 'dismissed' where id = $1", "action_b"),
        ("delete from public.worklogs where id = $1", "worklog_b"),
        ("delete from public.workspace_members where workspace_id = $1", "ws_b"),
    ]
    for sql, key in statements:
        async with acting_as(conn, ids["owner"]):
            assert await conn.execute(sql, ids[key]) in ("UPDATE 0", "DELETE 0"), sql
    assert await conn.fetchval("select name from public.workspaces where id = $1", ids["ws_b"]) == "B"
    assert await conn.fetchval("select count(*) from public.workspace_members where workspace_id = $1",
                               ids["ws_b"]) == 1


async def test_creator_removed_from_members_loses_the_workspace(db: asyncpg.Connection) -> None:
    """Ownership handed over, then the creator removed by the new owner: the creator is a stranger now."""
    creator, heir = await new_user(db), await new_user(db)
    workspace = await new_workspace(db, creator, "Handed over")
    await add_member(db, workspace, heir, "owner")
    async with acting_as(db, heir):
        removed = await db.execute(
            "delete from public.workspace_members where workspace_id = $1 and user_id = $2",
            workspace, creator,
        )
    assert removed == "DELETE 1"
    async with acting_as(db, creator, readonly=True):
        seen = await db.fetchval("select count(*) from public.workspaces where id = $1", workspace)
    try:
        async with acting_as(db, creator):
            deleted = await db.execute("delete from public.workspaces where id = $1", workspace)
            raise _Rollback
    except _Rollback:
        pass
    assert (seen, deleted) == (0, "DELETE 0")
