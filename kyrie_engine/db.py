"""Connections, and acting as a Supabase user inside one.

`acting_as` is how every read on behalf of a user happens (the agent's tools,
the membership check of the API, the tests' RLS matrix): the same `SET LOCAL
ROLE authenticated` plus `request.jwt.claims` that PostgREST performs, so the
database's policies, not Python, decide what that user sees.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from kyrie_engine.outages import COMMAND_TIMEOUT
from kyrie_engine.settings import is_transaction_pooler


def driver_dsn(dsn: str) -> str:
    """The DSN without `pgbouncer=true`: a hint for us, which asyncpg would send as a server setting."""
    parts = urlsplit(dsn)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in pairs if k.lower() != "pgbouncer"]
    if len(query) == len(pairs):
        return dsn
    return urlunsplit(parts._replace(query=urlencode(query)))


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """Prepared statements do not survive a transaction pooler; turn them off there."""
    return {"statement_cache_size": 0} if is_transaction_pooler(dsn) else {}


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float | None = COMMAND_TIMEOUT,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose every query is bounded by `command_timeout` (seconds): on a
    connection that went silent, a query would otherwise wait forever."""
    pool = await asyncpg.create_pool(
        driver_dsn(dsn), min_size=min_size, max_size=max_size, command_timeout=command_timeout,
        **connect_kwargs(dsn), **kwargs,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def acting_as(
    conn: asyncpg.Connection,
    user_id: UUID | str | None,
    *,
    email: str | None = None,
    readonly: bool = False,
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction in which `conn` is the given user (or `anon` when None).

    Everything is SET LOCAL, so the role and claims end with the transaction
    and a pooled connection goes back clean even if the block raises.
    """
    role = "anon" if user_id is None else "authenticated"
    claims: dict[str, Any] = {"role": role}
    if user_id is not None:
        claims["sub"] = str(user_id)
    if email is not None:
        claims["email"] = email
    async with conn.transaction(readonly=readonly):
        await conn.execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            role,
            json.dumps(claims),
        )
        yield conn


class BoundedPool:
    """A pool's statements with every wait bounded, the connection's return included.

    `command_timeout` ends a query on a silent connection, but the pool then
    waits for the server to acknowledge the cancel before it takes the
    connection back, up to `command_timeout` again (measured: a hung claim
    surfaced after 2 x 10 s).  A connection acquired with a timeout is
    released within that timeout, and terminated if it cannot be: so a
    statement here fails within `command_timeout + acquire_timeout`.
    """

    def __init__(
        self, pool: asyncpg.Pool, timeout: float = COMMAND_TIMEOUT, acquire_timeout: float | None = None
    ) -> None:
        self.pool = pool
        self.timeout = timeout  # per statement, whatever the pool's own (a pool given by a host)
        self.acquire_timeout = timeout if acquire_timeout is None else acquire_timeout

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:  # noqa: ASYNC109 - asyncpg's signature
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetch(query, *args, timeout=timeout or self.timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:  # noqa: ASYNC109 - asyncpg's signature
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetchrow(query, *args, timeout=timeout or self.timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - asyncpg's signature
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetchval(query, *args, timeout=timeout or self.timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 - asyncpg's signature
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.execute(query, *args, timeout=timeout or self.timeout)


async def session_unchanged(conn: asyncpg.Connection) -> None:
    """A pool `reset` for code that leaves no session state behind: it skips
    asyncpg's reset query (`RESET ALL`, `UNLISTEN *`, `CLOSE ALL`, advisory
    unlock), one round trip per release, a fifth of an HTTP accept's.

    Its users' statements and transactions are all that run on their
    pooled connections: the API's routes set a user's role and claims with
    `SET LOCAL` (`acting_as`), the enqueue's `kyrie.wake_after_commit` is
    transaction-local, LISTEN happens on the notifier's own connection, and
    nothing takes a session advisory lock; the worker's own statements are
    single statements.  A transaction left open (a request cancelled
    mid-way) is still rolled back by asyncpg before this is called.  A pool
    given by a host is reset as the host configured it."""
