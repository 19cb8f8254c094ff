"""Invites through their three functions: create_invite, get_invite_by_token, redeem_invite.

Every refusal is checked for what it leaves behind (the members of the
workspace, and whether the invite still exists), because the functions rely
on "raise rolls back the DELETE" for single use, and that is the part a
refactor would break silently.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass

import asyncpg
import pytest
from support import add_member, new_user, new_workspace

from kyrie_engine.db import acting_as

INVALID = "KY001"
EXPIRED = "KY002"
WRONG_EMAIL = "KY003"
DENIED = "42501"
BAD_ARGUMENT = "22023"


@dataclass
class Team:
    workspace: uuid.UUID
    owner: uuid.UUID
    admin: uuid.UUID
    member: uuid.UUID


async def new_team(db: asyncpg.Connection) -> Team:
    owner = await new_user(db, "owner@example.test")
    admin = await new_user(db, "admin@example.test")
    member = await new_user(db, "member@example.test")
    workspace = await new_workspace(db, owner, "Studio Kyrie")
    await add_member(db, workspace, admin, "admin")
    await add_member(db, workspace, member, "member")
    return Team(workspace, owner, admin, member)


async def create_invite(db: asyncpg.Connection, user: uuid.UUID, workspace: uuid.UUID, role: str = "member",
                        email: str | None = None, valid_for: str = "7 days") -> str:
    async with acting_as(db, user):
        token = await db.fetchval("select public.create_invite($1, $2, $3, $4::text::interval)",
                                  workspace, role, email, valid_for)
    assert isinstance(token, str)
    return token


async def redeem(db: asyncpg.Connection, user: uuid.UUID | None, token: str,
                 email: str | None = None) -> asyncpg.Record | str:
    """The row redeem_invite returns, or the SQLSTATE it raised."""
    try:
        async with acting_as(db, user, email=email):
            return await db.fetchrow("select * from public.redeem_invite($1)", token)
    except asyncpg.PostgresError as error:
        return str(error.sqlstate)


async def state(db: asyncpg.Connection, workspace: uuid.UUID) -> tuple[int, int]:
    """(members, invites) of the workspace, read as the superuser."""
    row = await db.fetchrow(
        "select (select count(*) from public.workspace_members where workspace_id = $1) as members, "
        "(select count(*) from public.invites where workspace_id = $1) as invites", workspace
    )
    return row["members"], row["invites"]


async def role_of(db: asyncpg.Connection, workspace: uuid.UUID, user: uuid.UUID) -> str | None:
    return await db.fetchval(
        "select role from public.workspace_members where workspace_id = $1 and user_id = $2", workspace, user
    )


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# ---------------------------------------------------------------------------
# create_invite


@pytest.mark.parametrize("who", ["owner", "admin"])
async def test_owners_and_admins_create_invites(db: asyncpg.Connection, who: str) -> None:
    team = await new_team(db)
    user = getattr(team, who)
    token = await create_invite(db, user, team.workspace, role="admin", email=" Bob@Example.TEST ")
    assert len(token) == 64 and int(token, 16) >= 0
    row = await db.fetchrow("select * from public.invites where workspace_id = $1", team.workspace)
    # Only the hash is stored: the raw token appears in no column.
    assert bytes(row["token_hash"]) == token_hash(token)
    assert token not in repr(dict(row))
    assert (row["role"], row["email"], row["created_by"]) == ("admin", "bob@example.test", user)
    assert await db.fetchval("select $1::timestamptz - now() > interval '6 days 23 hours'", row["expires_at"])


async def test_two_invites_get_different_tokens(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    tokens = {await create_invite(db, team.owner, team.workspace) for _ in range(5)}
    assert len(tokens) == 5


@pytest.mark.parametrize(
    ("who", "args", "sqlstate"),
    [
        ("member", ("member", "7 days"), DENIED),
        ("stranger", ("member", "7 days"), DENIED),
        ("anon", ("member", "7 days"), DENIED),
        ("owner", ("owner", "7 days"), BAD_ARGUMENT),
        ("owner", ("guest", "7 days"), BAD_ARGUMENT),
        ("owner", ("member", "31 days"), BAD_ARGUMENT),
        ("owner", ("member", "-1 day"), BAD_ARGUMENT),
    ],
)
async def test_create_invite_refusals(db: asyncpg.Connection, who: str, args: tuple[str, str],
                                      sqlstate: str) -> None:
    team = await new_team(db)
    users = {"owner": team.owner, "member": team.member, "stranger": await new_user(db), "anon": None}
    with pytest.raises(asyncpg.PostgresError) as raised:
        async with acting_as(db, users[who]):
            await db.fetchval("select public.create_invite($1, $2, null, $3::text::interval)",
                              team.workspace, *args)
    assert raised.value.sqlstate == sqlstate
    assert await state(db, team.workspace) == (3, 0)


# ---------------------------------------------------------------------------
# get_invite_by_token


async def test_anon_reads_an_invite_by_token(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, role="admin", email="bob@example.test")
    async with acting_as(db, None, readonly=True):
        rows = await db.fetch("select * from public.get_invite_by_token($1)", token)
    assert len(rows) == 1
    invite = dict(rows[0])
    # Exactly what the page shows: no token hash, no bound email, no ids.
    assert set(invite) == {"workspace_name", "role", "expires_at", "is_valid"}
    assert (invite["workspace_name"], invite["role"], invite["is_valid"]) == ("Studio Kyrie", "admin", True)
    stored = await db.fetchval("select expires_at from public.invites where workspace_id = $1",
                               team.workspace)
    assert invite["expires_at"] == stored


async def test_get_invite_by_wrong_token_is_no_row(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace)
    for wrong in ("", token[:-1], token.upper(), uuid.uuid4().hex * 2):
        async with acting_as(db, None, readonly=True):
            assert await db.fetch("select * from public.get_invite_by_token($1)", wrong) == []


async def test_get_expired_invite_says_not_valid(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace)
    await expire(db, token)
    async with acting_as(db, None, readonly=True):
        row = await db.fetchrow("select * from public.get_invite_by_token($1)", token)
    assert row is not None and row["is_valid"] is False


async def expire(db: asyncpg.Connection, token: str) -> None:
    """As the superuser: the check (expires_at > created_at) is kept by moving both back."""
    await db.execute(
        "update public.invites "
        "set created_at = now() - interval '8 days', expires_at = now() - interval '1 day' "
        "where token_hash = $1", token_hash(token),
    )


# ---------------------------------------------------------------------------
# redeem_invite


async def test_redeem_valid_invite(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.admin, team.workspace, role="admin")
    joiner = await new_user(db)
    row = await redeem(db, joiner, token)
    assert not isinstance(row, str)
    assert (row["workspace_id"], row["role"], row["already_member"]) == (team.workspace, "admin", False)
    assert await state(db, team.workspace) == (4, 0)
    assert await role_of(db, team.workspace, joiner) == "admin"
    # The new member now sees the workspace through RLS.
    async with acting_as(db, joiner, readonly=True):
        assert await db.fetchval("select name from public.workspaces where id = $1", team.workspace) \
            == "Studio Kyrie"


async def test_redeem_email_bound_invite_with_right_email(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, email="bob@example.test")
    bob = await new_user(db, "bob@example.test")
    row = await redeem(db, bob, token, email=" Bob@Example.test")
    assert not isinstance(row, str) and row["already_member"] is False
    assert await state(db, team.workspace) == (4, 0)


@pytest.mark.parametrize(
    ("case", "sqlstate", "invite_left"),
    [
        ("wrong-token", INVALID, 1),
        ("expired", EXPIRED, 1),
        ("reused", INVALID, 0),
        ("wrong-email", WRONG_EMAIL, 1),
        ("no-email-claim", WRONG_EMAIL, 1),
        ("anon", DENIED, 1),
    ],
)
async def test_redeem_refusals_change_nothing(db: asyncpg.Connection, case: str, sqlstate: str,
                                              invite_left: int) -> None:
    team = await new_team(db)
    email = "bob@example.test" if case in ("wrong-email", "no-email-claim") else None
    token = await create_invite(db, team.owner, team.workspace, email=email)
    joiner: uuid.UUID | None = await new_user(db, "eve@example.test")
    claim_email: str | None = "eve@example.test"
    if case == "wrong-token":
        token = token[:-1] + ("0" if token[-1] != "0" else "1")
    elif case == "expired":
        await expire(db, token)
    elif case == "reused":
        first = await redeem(db, await new_user(db), token)
        assert not isinstance(first, str)
    elif case == "no-email-claim":
        claim_email = None
    elif case == "anon":
        joiner = None
    before = await state(db, team.workspace)

    assert await redeem(db, joiner, token, email=claim_email) == sqlstate
    assert await state(db, team.workspace) == (before[0], invite_left)
    if joiner is not None:
        assert await db.fetchval("select count(*) from public.workspace_members where user_id = $1",
                                 joiner) == 0


@pytest.mark.parametrize("invited_as", ["admin", "member"])
async def test_redeem_when_already_a_member(db: asyncpg.Connection, invited_as: str) -> None:
    """The invite is used up; the membership stays exactly as it was (no promotion, no demotion)."""
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, role=invited_as)
    for user, role in ((team.member, "member"), (team.admin, "admin")):
        token = await create_invite(db, team.owner, team.workspace, role=invited_as)
        row = await redeem(db, user, token)
        assert not isinstance(row, str)
        assert (row["workspace_id"], row["role"], row["already_member"]) == (team.workspace, role, True)
        assert await role_of(db, team.workspace, user) == role
    # The first invite is still there; the two redeemed ones are gone.
    assert await state(db, team.workspace) == (3, 1)


# ---------------------------------------------------------------------------
# Two redemptions racing on two connections


async def _wait_until_blocked(db: asyncpg.Connection, pids: list[int]) -> None:
    """Until both backends wait on a lock: then both redeem statements are truly in flight."""
    for _ in range(2000):
        waiting = await db.fetchval(
            "select count(*) from pg_stat_activity where pid = any($1::int[]) and wait_event_type = 'Lock'",
            pids,
        )
        if waiting == len(pids):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the redemptions never both waited on the lock")


@pytest.mark.parametrize("lock", ["table", "row"])
async def test_concurrent_redemptions_exactly_one_wins(db: asyncpg.Connection, db_dsn: str,
                                                       lock: str) -> None:
    """Both calls are blocked behind a lock held by a third connection, then released together.

    "table": both wait to open public.invites, then race for the row itself;
    "row": both wait on the invite's row lock, the case the function's comment reasons about.
    Either way the loser must get KY001 once the winner commits, never a second membership.
    """
    team = await new_team(db)
    one, two = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        pids = [one.get_server_pid(), two.get_server_pid()]
        for _ in range(5):
            token = await create_invite(db, team.owner, team.workspace)
            alice, bob = await new_user(db), await new_user(db)
            before = await state(db, team.workspace)
            async with db.transaction():
                if lock == "table":
                    await db.execute("lock table public.invites in exclusive mode")
                else:
                    await db.execute("select 1 from public.invites where token_hash = $1 for update",
                                     token_hash(token))
                racing = asyncio.gather(redeem(one, alice, token), redeem(two, bob, token))
                await _wait_until_blocked(db, pids)
            results = await racing

            winners = [r for r in results if not isinstance(r, str)]
            assert len(winners) == 1, results
            assert [r for r in results if isinstance(r, str)] == [INVALID]
            assert winners[0]["already_member"] is False
            assert await state(db, team.workspace) == (before[0] + 1, before[1] - 1)
            joined = await db.fetchval(
                "select count(*) from public.workspace_members where workspace_id = $1 and user_id = any($2)",
                team.workspace, [alice, bob])
            assert joined == 1
    finally:
        await one.close()
        await two.close()


@pytest.mark.parametrize("how", ["removed", "demoted", "left"])
async def test_an_admin_who_loses_the_role_cannot_walk_back_in(db: asyncpg.Connection, how: str) -> None:
    """Links an admin made are withdrawn when they stop being one; none lets them back in."""
    team = await new_team(db)
    token = await create_invite(db, team.admin, team.workspace, role="admin")
    if how == "removed":
        async with acting_as(db, team.owner):
            await db.execute("delete from public.workspace_members where workspace_id = $1 and user_id = $2",
                             team.workspace, team.admin)
    elif how == "demoted":
        async with acting_as(db, team.owner):
            await db.execute("update public.workspace_members set role = 'member' "
                             "where workspace_id = $1 and user_id = $2", team.workspace, team.admin)
    else:
        async with acting_as(db, team.admin):
            await db.execute("delete from public.workspace_members where workspace_id = $1 and user_id = $2",
                             team.workspace, team.admin)
    assert await state(db, team.workspace) == (3 if how == "demoted" else 2, 0)
    assert await redeem(db, team.admin, token) == "KY001"
    assert await role_of(db, team.workspace, team.admin) == ("member" if how == "demoted" else None)


async def test_redeeming_checks_the_maker_is_still_an_admin(db: asyncpg.Connection) -> None:
    """Even an invite that escaped the withdrawal trigger (made before it existed) is refused."""
    team = await new_team(db)
    token = await create_invite(db, team.admin, team.workspace)
    await db.execute(
        "alter table public.workspace_members disable trigger workspace_members_withdraw_invites"
    )
    await db.execute("update public.workspace_members set role = 'member' where user_id = $1", team.admin)
    outsider = await new_user(db)
    assert await redeem(db, outsider, token) == "KY001"
    assert await state(db, team.workspace) == (3, 1)  # refused: nothing changed


async def test_owners_and_admins_withdraw_pending_invites(db: asyncpg.Connection) -> None:
    team = await new_team(db)
    tokens = [await create_invite(db, team.owner, team.workspace) for _ in range(3)]
    with pytest.raises(asyncpg.PostgresError) as raised:
        async with acting_as(db, team.member):
            await db.fetchval("select public.revoke_invites($1)", team.workspace)
    assert raised.value.sqlstate == "42501"
    assert await state(db, team.workspace) == (3, 3)
    async with acting_as(db, team.admin):
        assert await db.fetchval("select public.revoke_invites($1)", team.workspace) == 3
    assert await redeem(db, await new_user(db), tokens[0]) == "KY001"


# ---------------------------------------------------------------------------
# the 30-day cap is on the expiry (issue 11, finding 3)


@pytest.mark.parametrize(
    "valid_for",
    ["1000 years -359970 days", "12 months -330 days", "30 days 1 second", "721 hours",
     "1 year", "-1 second", "0", "1 month -31 days", "300000 years", "-300000 years"],
)
async def test_an_interval_that_lands_past_30_days_is_refused(db: asyncpg.Connection, valid_for: str) -> None:
    """Compared as intervals (a month 30 days, a year 360) the first two pass; their expiry does not."""
    team = await new_team(db)
    with pytest.raises(asyncpg.PostgresError) as raised:
        await create_invite(db, team.owner, team.workspace, valid_for=valid_for)
    assert raised.value.sqlstate == BAD_ARGUMENT
    assert "at most 30 days" in str(raised.value)
    assert await state(db, team.workspace) == (3, 0)


async def test_one_month_is_refused_when_it_is_longer_than_30_days(db: asyncpg.Connection) -> None:
    """'1 month' from the 1st of December is 31 days; from a day in February it would be fewer."""
    team = await new_team(db)
    longer = await db.fetchval("select now() + interval '1 month' > now() + interval '30 days'")
    if not longer:
        pytest.skip("this month plus one is not longer than 30 days today")
    with pytest.raises(asyncpg.PostgresError) as raised:
        await create_invite(db, team.owner, team.workspace, valid_for="1 month")
    assert raised.value.sqlstate == BAD_ARGUMENT
    assert await state(db, team.workspace) == (3, 0)


@pytest.mark.parametrize(
    "valid_for", ["30 days", "720 hours", "29 days 23:59:59", "1 second", "1 month -2 days"]
)
async def test_up_to_30_days_of_expiry_is_accepted(db: asyncpg.Connection, valid_for: str) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, valid_for=valid_for)
    expires = await db.fetchval(
        "select expires_at - created_at from public.invites where token_hash = $1", token_hash(token)
    )
    assert expires <= dt.timedelta(days=30)


# ---------------------------------------------------------------------------
# email binding folds ASCII case only, on the confirmed address (issue 11, finding 4)


@pytest.mark.parametrize(
    ("bound", "address", "redeems"),
    [
        ("kate@corp.test", "kate@corp.test", True),
        ("kate@corp.test", "KATE@Corp.TEST", True),
        ("KATE@corp.test", "kate@corp.test", True),
        ("kate@corp.test", "\u212aate@corp.test", False),  # KELVIN SIGN: lower() makes it "k"
        ("\u212aate@corp.test", "kate@corp.test", False),
        ("kate@corp.test", "\u212aATE@corp.test", False),
        ("istanbul@corp.test", "\u0130stanbul@corp.test", False),  # dotted capital I
        ("strasse@corp.test", "stra\u00dfe@corp.test", False),  # sharp s
        ("kate@corp.test", "kate@corp.test\u200b", False),  # zero-width space
        ("kate@corp.test", "k\u0430te@corp.test", False),  # Cyrillic a
        ("\u00e9mile@corp.test", "\u00c9mile@corp.test", False),  # no folding beyond ASCII
    ],
)
async def test_the_bound_address_matches_ascii_case_insensitively_and_nothing_more(
    db: asyncpg.Connection, bound: str, address: str, redeems: bool
) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, email=bound)
    joiner = await new_user(db, address)
    # The claim says the bound address: what counts is the confirmed one.
    result = await redeem(db, joiner, token, email=bound)
    if redeems:
        assert not isinstance(result, str)
        assert await state(db, team.workspace) == (4, 0)
    else:
        assert result == WRONG_EMAIL
        assert await state(db, team.workspace) == (3, 1)
        assert await role_of(db, team.workspace, joiner) is None


@pytest.mark.parametrize("case", ["unconfirmed", "claim-only", "claim-kelvin"])
async def test_the_confirmed_address_wins_over_the_token_claim(db: asyncpg.Connection, case: str) -> None:
    team = await new_team(db)
    token = await create_invite(db, team.owner, team.workspace, email="kate@corp.test")
    if case == "unconfirmed":  # the right address, never confirmed
        joiner = await new_user(db, "kate@corp.test", confirmed=False)
        claim = "kate@corp.test"
    elif case == "claim-only":  # a token claiming the address of another account
        joiner = await new_user(db, "eve@corp.test")
        claim = "kate@corp.test"
    else:
        joiner = await new_user(db, "\u212aate@corp.test")
        claim = "kate@corp.test"
    assert await redeem(db, joiner, token, email=claim) == WRONG_EMAIL
    assert await state(db, team.workspace) == (3, 1)
    # The invite survived for the right person.
    kate = await new_user(db, "Kate@corp.test")
    assert not isinstance(await redeem(db, kate, token, email=None), str)
    assert await role_of(db, team.workspace, kate) == "member"
