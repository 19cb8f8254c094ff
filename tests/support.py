"""Factories for rows the tests need, inserted as the superuser (no RLS).

Tests then read and write *as* these users through `kyrie_engine.db.acting_as`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg


async def new_user(
    conn: asyncpg.Connection, email: str | None = None, *, confirmed: bool = True
) -> uuid.UUID:
    """A user whose address is confirmed (as after Supabase's sign-up link) unless told otherwise."""
    email = email or f"user-{uuid.uuid4().hex[:8]}@example.test"
    return await conn.fetchval(
        "insert into auth.users (email, email_confirmed_at) values ($1, case when $2 then now() end) "
        "returning id",
        email, confirmed,
    )


async def new_workspace(conn: asyncpg.Connection, owner: uuid.UUID, name: str = "Studio") -> uuid.UUID:
    """The insert trigger makes `owner` the workspace's owner member."""
    return await conn.fetchval(
        "insert into public.workspaces (name, created_by) values ($1, $2) returning id", name, owner
    )


async def add_member(conn: asyncpg.Connection, workspace: uuid.UUID, user: uuid.UUID, role: str) -> None:
    await conn.execute(
        "insert into public.workspace_members (workspace_id, user_id, role) values ($1, $2, $3)",
        workspace, user, role,
    )


async def new_contract(conn: asyncpg.Connection, workspace: uuid.UUID, **fields: Any) -> uuid.UUID:
    values: dict[str, Any] = {
        "client_name": "Acme",
        "title": "Website",
        "billing_type": "hourly",
        "hourly_rate": Decimal("100"),
        "currency": "USD",
        "start_date": dt.date(2026, 1, 1),
    }
    values.update(fields)
    if values["billing_type"] == "fixed":
        values.pop("hourly_rate", None)
    columns = ["workspace_id", *values]
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return await conn.fetchval(
        f"insert into public.contracts ({', '.join(columns)}) values ({placeholders}) returning id",
        workspace, *values.values(),
    )


async def add_worklog(
    conn: asyncpg.Connection,
    contract: uuid.UUID,
    user: uuid.UUID,
    *,
    hours: Decimal | float = Decimal("2"),
    work_date: dt.date = dt.date(2026, 2, 2),
    description: str = "work",
    billable: bool = True,
    invoiced: bool = False,
) -> uuid.UUID:
    return await conn.fetchval(
        """
        insert into public.worklogs (workspace_id, contract_id, user_id, work_date, hours, description,
                                     billable, invoiced)
        select c.workspace_id, c.id, $2, $3, $4, $5, $6, $7 from public.contracts c where c.id = $1
        returning id
        """,
        contract, user, work_date, Decimal(str(hours)), description, billable, invoiced,
    )
