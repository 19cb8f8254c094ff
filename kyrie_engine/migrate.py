"""Apply the bundled migrations (`kyrie_engine/sql/`) the way the Supabase CLI would.

Migrations are the files `kyrie_engine/sql/<version>_<name>.sql` (package
data: found through importlib.resources from a checkout, an installed wheel or
`uvx`), applied in version order, each in its own transaction, and recorded in
`supabase_migrations.schema_migrations` exactly as `supabase db push` records
them: (`version`, `name`, `statements`), the statements split and trimmed by
the CLI's own rules (`kyrie_engine.sql_split`).  So the two writers produce
identical rows, `supabase migration list` agrees with this command, and a
project may switch between them in either order.

An applied migration is history and is never edited: a file whose statements
differ from the recorded ones is refused, naming it.  A row is recognised when
its statements are the file's split statements (the CLI, and this command
since 0.1.1) or the file's whole text as one statement (this command before);
a row with no statements at all (written by an old CLI, before the column
existed) cannot be checked and counts as applied.

`sql/supabase_standins.sql` is not a migration: it is applied first, only where
Supabase's own `auth.uid()` is missing (plain PostgreSQL), and never exported.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import asyncpg

from kyrie_engine.sql_split import split_and_trim

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

    @cached_property
    def statements(self) -> list[str]:
        """What the Supabase CLI stores for this file (and what `migrate` stores)."""
        return split_and_trim(self.text)

    def recorded_as(self, statements: Sequence[str] | None) -> bool:
        """Whether a history row's statements are this file, as either writer recorded it."""
        if not statements:
            return True  # an old CLI's row (version only): nothing to compare
        stored = list(statements)
        return stored == self.statements or stored == [self.text]


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


def _bundled(sql_dir: Path) -> list[Migration]:
    """The migrations, or an error rather than "nothing to apply" when the package lacks them."""
    migrations = find_migrations(sql_dir)
    if not migrations:
        raise MigrationError(f"no migrations found in {sql_dir}: the installed package is incomplete")
    return migrations


# The CLI's own statements (pkg/migration/history.go), so whichever writer
# comes first creates the same table.
_HISTORY_DDL = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text not null primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""


async def _applied(conn: asyncpg.Connection) -> dict[str, list[str] | None]:
    exists = await conn.fetchval(
        "select to_regclass('supabase_migrations.schema_migrations') is not null"
    )
    if not exists:
        return {}
    has_statements = await conn.fetchval(
        "select exists (select from information_schema.columns where table_schema = 'supabase_migrations'"
        " and table_name = 'schema_migrations' and column_name = 'statements')"
    )
    column = "statements" if has_statements else "null::text[]"
    rows = await conn.fetch(
        f"select version, {column} as statements from supabase_migrations.schema_migrations"
    )
    return {row["version"]: row["statements"] for row in rows}


async def status(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[MigrationState]:
    applied = await _applied(conn)
    states = []
    for m in find_migrations(sql_dir):
        done = m.version in applied
        states.append(MigrationState(m, done, done and not m.recorded_as(applied[m.version])))
    return states


async def apply_standins(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> bool:
    """Create Supabase's roles, auth schema and publication where they are absent."""
    if await conn.fetchval("select to_regprocedure('auth.uid()') is not null"):
        return False
    async with conn.transaction():
        await conn.execute((sql_dir / "supabase_standins.sql").read_text())
    return True


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Apply pending migrations; return those applied.  Safe to run concurrently."""
    _bundled(sql_dir)
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await apply_standins(conn, sql_dir)
        await conn.execute(_HISTORY_DDL)
        states = await status(conn, sql_dir)
        changed = [s.migration.path.name for s in states if s.changed]
        if changed:
            raise MigrationError(
                f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} changed after "
                f"{'it was' if len(changed) == 1 else 'they were'} applied; applied migrations are never "
                f"edited: restore {'it' if len(changed) == 1 else 'them'} and add a new migration instead"
            )
        done: list[Migration] = []
        for state in states:
            m = state.migration
            if state.applied:
                continue
            try:
                async with conn.transaction():
                    # The file as one simple-protocol batch (one transaction, as
                    # the CLI's batch is); recorded as the CLI would split it.
                    await conn.execute(m.text)
                    await conn.execute(
                        "insert into supabase_migrations.schema_migrations (version, name, statements)"
                        " values ($1, $2, $3)",
                        m.version, m.name, m.statements,
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


@dataclass(frozen=True)
class Exported:
    written: list[str]
    unchanged: list[str]
    conflicts: list[str]  # files already in the target that differ: left untouched


def export(target: Path, sql_dir: Path = SQL_DIR) -> Exported:
    """Copy the migrations (never the stand-ins) into `target`, e.g. a project's
    `supabase/migrations/`, under the names the Supabase CLI expects (the same
    `<version>_<name>.sql`).  Idempotent; a file of the same name with other
    content is somebody's history and is never overwritten."""
    target.mkdir(parents=True, exist_ok=True)
    result = Exported([], [], [])
    for m in _bundled(sql_dir):
        data = m.path.read_bytes()
        dest = target / m.path.name
        if dest.exists():
            (result.unchanged if dest.read_bytes() == data else result.conflicts).append(dest.name)
            continue
        dest.write_bytes(data)
        result.written.append(dest.name)
    return result


def _print_export(target: Path) -> int:
    result = export(target)
    for name in result.written:
        print(f"wrote     {target / name}")
    for name in result.unchanged:
        print(f"unchanged {target / name}")
    for name in result.conflicts:
        print(
            f"kyrie-engine migrate: {target / name} exists with other content; left untouched "
            f"(an applied migration is never edited: compare it with this package's)",
            file=sys.stderr,
        )
    return 1 if result.conflicts else 0


async def _main(args: argparse.Namespace) -> int:
    from kyrie_engine.settings import database_url_from_env

    dsn = database_url_from_env()
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        if args.status:
            states = await status(conn)
            for state in states:
                mark = "changed" if state.changed else ("applied" if state.applied else "pending")
                print(f"{mark:8} {state.migration.path.name}")
            return 1 if any(s.changed for s in states) else 0
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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="list applied, pending and changed migrations")
    mode.add_argument(
        "--export", type=Path, metavar="DIR",
        help="write the migrations into DIR (e.g. supabase/migrations) for the Supabase CLI; no database",
    )
    args = parser.parse_args(argv)
    try:
        if args.export is not None:
            try:
                return _print_export(args.export)
            except OSError as exc:
                print(f"kyrie-engine migrate: cannot export into {args.export}: {exc}", file=sys.stderr)
                return 1
        return asyncio.run(_main(args))
    except MigrationError as exc:
        print(f"kyrie-engine migrate: {exc}", file=sys.stderr)
        return 1
