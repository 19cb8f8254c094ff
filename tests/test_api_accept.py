"""The accept in one statement (kyrie.accept_job) and the membership rule it shares with the policies."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from support import add_member, new_user, new_workspace

from kyrie_engine.db import acting_as


async def _case(db: asyncpg.Connection, who: str) -> tuple[uuid.UUID, uuid.UUID]:
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    if who == "owner":
        return workspace, owner
    user = await new_user(db)
    if who in ("admin", "member"):
        await add_member(db, workspace, user, who)
    elif who == "removed":
        await add_member(db, workspace, user, "member")
        await db.execute("delete from public.workspace_members where user_id = $1", user)
    elif who == "member-elsewhere":
        await new_workspace(db, user)
    elif who == "unknown":
        return workspace, uuid.uuid4()
    return workspace, user


@pytest.mark.parametrize(
    "who", ["owner", "admin", "member", "stranger", "removed", "member-elsewhere", "unknown"]
)
async def test_accept_job_applies_the_rule_every_policy_uses(db: asyncpg.Connection, who: str) -> None:
    workspace, user = await _case(db, who)
    async with acting_as(db, user, readonly=True):
        policy_says = await db.fetchval("select kyrie.is_workspace_member($1)", workspace)
        sees_workspace = await db.fetchval("select count(*) from public.workspaces where id = $1", workspace)
    assert bool(policy_says) == bool(sees_workspace)  # the rule is the policies' rule
    row = await db.fetchrow(
        "select * from kyrie.accept_job('cfo.analyze', '{}'::jsonb, $1, $2, null)", workspace, user
    )
    assert (row["outcome"] == "accepted") == policy_says
    jobs = await db.fetchval("select count(*) from public.jobs")
    if policy_says:
        assert row["created"] is True and jobs == 1
        job = await db.fetchrow("select workspace_id, user_id, status from public.jobs where id = $1",
                                row["job_id"])
        assert tuple(job) == (workspace, user, "pending")
    else:
        assert tuple(row) == ("not_a_member", None, False) and jobs == 0


async def test_accept_job_refuses_an_unknown_workspace_and_replays_a_key(db: asyncpg.Connection) -> None:
    user = await new_user(db)
    workspace = await new_workspace(db, user)
    unknown = await db.fetchrow(
        "select * from kyrie.accept_job('cfo.analyze', '{}'::jsonb, $1, $2, null)", uuid.uuid4(), user
    )
    assert tuple(unknown) == ("workspace_not_found", None, False)
    first, again = [
        await db.fetchrow("select * from kyrie.accept_job('cfo.analyze', '{}'::jsonb, $1, $2, 'k')",
                          workspace, user)
        for _ in range(2)
    ]
    assert first["created"] is True and again["created"] is False and first["job_id"] == again["job_id"]
    assert await db.fetchval("select count(*) from public.jobs") == 1


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_the_engine_only_functions_are_not_callable_by_app_roles(
    db: asyncpg.Connection, role: str
) -> None:
    """is_member_of answers for anyone, so a signed-in user could probe other workspaces with it."""
    user = await new_user(db)
    workspace = await new_workspace(db, user)
    for call in ("select kyrie.is_member_of($1, $2)",
                 "select * from kyrie.accept_job('cfo.analyze', '{}'::jsonb, $1, $2, null)"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(db, None if role == "anon" else user):
                await db.fetchval(call, workspace, user)
    assert await db.fetchval("select count(*) from public.jobs") == 0
