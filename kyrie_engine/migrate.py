"""Apply the bundled migrations (`kyrie_engine/sql/`) the way the Supabase CLI would.

Migrations are the files `kyrie_engine/sql/<version>_<name>.sql`, applied in version order,
each in its own transaction, and recorded in
`supabase_migrations.schema_migrations` with the CLI's columns (`version`,
`name`, `statements`), so `supabase migration list` agrees with this command
and a project can switch between the two.  The file's text is stored as its
single statement; a file whose text differs from what was applied is refused,
because an applied migration is history and is never edited.

`sql/supabase_standins.sql` is not a migration: it is applied first, only where
Supabase's own `auth.uid()` is missing (plain PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

# Package data: the same folder in a checkout, an installed wheel or `uvx`.
SQL_DIR = Path(str(resources.files("kyrie_engine") / "sql"))
_FILE_RE = re.compile(r"^(?P<version>\d{14})_(?P<name>[a-z0-9_]+)\.sql$")

# Any constant will do; it only has to be the same for every migrating process.
_LOCK_KEY = 0x6B797269  # "kyri"


class MigrationError(Exception):
    """A migration cannot be applied; the message says which and why."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text()


@dataclass(frozen=True)
class MigrationState:
    migration: Migration
    applied: bool
    changed: bool


def find_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match:
            migrations.append(Migration(match["version"], match["name"], path))
    return migrations


_HISTORY_DDL = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text not null primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""


async def _applied(conn: asyncpg.Connection) -> dict[str, str]:
    exists = await conn.fetchval(
        "select to_regclass('supabase_migrations.schema_migrations') is not null"
    )
    if not exists:
        return {}
    rows = await conn.fetch(
        "select version, array_to_string(coalesce(statements, '{}'), '') as text"
        " from supabase_migrations.schema_migrations"
    )
    return {row["version"]: row["text"] for row in rows}


async def status(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[MigrationState]:
    applied = await _applied(conn)
    return [
        MigrationState(m, m.version in applied, m.version in applied and applied[m.version] != m.text)
        for m in find_migrations(sql_dir)
    ]


async def apply_standins(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> bool:
    """Create Supabase's roles, auth schema and publication where they are absent."""
    if await conn.fetchval("select to_regprocedure('auth.uid()') is not null"):
        return False
    async with conn.transaction():
        await conn.execute((sql_dir / "supabase_standins.sql").read_text())
    return True


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Apply pending migrations; return those applied.  Safe to run concurrently."""
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await apply_standins(conn, sql_dir)
        await conn.execute(_HISTORY_DDL)
        done: list[Migration] = []
        for state in await status(conn, sql_dir):
            m = state.migration
            if state.changed:
                raise MigrationError(
                    f"{m.path.name} was changed after it was applied; applied migrations are "
                    f"never edited: restore it and add a new migration instead"
                )
            if state.applied:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(m.text)
                    await conn.execute(
                        "insert into supabase_migrations.schema_migrations (version, name, statements)"
                        " values ($1, $2, array[$3])",
                        m.version, m.name, m.text,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{m.path.name} failed: {exc}") from exc
            done.append(m)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate_dsn(dsn: str, sql_dir: Path = SQL_DIR) -> list[Migration]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await migrate(conn, sql_dir)
    finally:
        await conn.close()


async def _main(args: argparse.Namespace) -> int:
    from kyrie_engine.settings import database_url_from_env

    dsn = database_url_from_env()
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        if args.status:
            for state in await status(conn):
                mark = "changed" if state.changed else ("applied" if state.applied else "pending")
                print(f"{mark:8} {state.migration.path.name}")
            return 0
        applied = await migrate(conn)
    finally:
        await conn.close()
    for m in applied:
        print(f"applied  {m.path.name}")
    if not applied:
        print("nothing to apply: the database is up to date")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kyrie-engine migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--status", action="store_true", help="list applied and pending migrations")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except MigrationError as exc:
        print(f"kyrie-engine migrate: {exc}", file=sys.stderr)
        return 1
