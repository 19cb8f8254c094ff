"""Migrations: in order, once, recorded the Supabase CLI's way, never edited.

"The CLI's way" is its parser's split (`kyrie_engine.sql_split`, checked here
case by case against what `pkg/parser` of the Supabase CLI returns), and
rows written in that format by `supabase db push` must be recognised by
`migrate`, whichever of the two ran first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from kyrie_engine.migrate import SQL_DIR, MigrationError, find_migrations, migrate, status
from kyrie_engine.sql_split import split, split_and_trim


async def test_every_migration_is_recorded_with_its_version_and_name(db: asyncpg.Connection) -> None:
    rows = await db.fetch("select version, name from supabase_migrations.schema_migrations order by version")
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in find_migrations()]


async def test_a_second_run_applies_nothing(db: asyncpg.Connection) -> None:
    assert await migrate(db) == []
    assert all(s.applied and not s.changed for s in await status(db))


async def test_a_changed_migration_is_refused(db: asyncpg.Connection, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    first = sorted(sql_dir.glob("2*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after release\n")
    with pytest.raises(MigrationError, match=f"{first.name} was changed"):
        await migrate(db, sql_dir)


async def test_a_new_file_is_pending_then_applied(db: asyncpg.Connection, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    (sql_dir / "29991231000000_later.sql").write_text("create table public.later (id int);")
    pending = [s.migration.name for s in await status(db, sql_dir) if not s.applied]
    assert pending == ["later"]
    assert [m.name for m in await migrate(db, sql_dir)] == ["later"]


async def test_a_failing_migration_leaves_nothing_behind(db: asyncpg.Connection, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    (sql_dir / "29991231000000_broken.sql").write_text("create table public.half (id int);\nselect 1/0;")
    with pytest.raises(MigrationError, match=r"29991231000000_broken\.sql failed"):
        await migrate(db, sql_dir)
    assert await db.fetchval("select to_regclass('public.half')") is None
    assert not await db.fetchval(
        "select exists (select from supabase_migrations.schema_migrations where version = '29991231000000')"
    )


# ---------------------------------------------------------------------------
# the CLI's split: (file text, what `parser.SplitAndTrim` returns)

SPLITS = [
    ("select 1; select 2;\n", ["select 1", "select 2"]),
    ("select 1;;\n;  select 2", ["select 1", "select 2"]),
    ("select ';' as a;", ["select ';' as a"]),
    ("select 'it''s; fine';", ["select 'it''s; fine'"]),
    ('create policy "cats;dogs" on t;', ['create policy "cats;dogs" on t']),
    ("select $$ a; b $$; select $tag$ x;$$; $tag$;", ["select $$ a; b $$", "select $tag$ x;$$; $tag$"]),
    ("select $1 from t; select 2", ["select $1 from t", "select 2"]),
    ("-- a; comment\nselect 1; -- trailing; note\n", ["-- a; comment\nselect 1", "-- trailing; note"]),
    ("select /* a; /* nested; */ still; */ 1; select 2",
     ["select /* a; /* nested; */ still; */ 1", "select 2"]),
    ("select 1 - 2; select 3 / 4;", ["select 1 - 2", "select 3 / 4"]),
    ("select \\; 1; select 2", ["select \\; 1", "select 2"]),
    ("select 'a\\'; b';", ["select 'a\\'", "b'"]),  # no backslash escapes in quotes: as the CLI
    ("create rule r as on update to t do (notify t; select 1); select 2",
     ["create rule r as on update to t do (notify t; select 1)", "select 2"]),
    ("create function f() returns int language sql begin atomic select 1; select 2; end; select 3",
     ["create function f() returns int language sql begin atomic select 1; select 2; end", "select 3"]),
    ("create function my_atomic() returns void language plpgsql as $$ begin null; end $$; select 1",
     ["create function my_atomic() returns void language plpgsql as $$ begin null; end $$", "select 1"]),
    ("  \n\t select 'é→'; \n\n", ["select 'é→'"]),
    ("", []),
]


@pytest.mark.parametrize(("sql", "statements"), SPLITS)
def test_statements_are_split_as_the_supabase_cli_splits_them(sql: str, statements: list[str]) -> None:
    assert split_and_trim(sql) == statements
    assert "".join(split(sql)) == sql  # untrimmed pieces keep every byte


def test_our_migrations_split_into_statements_that_postgres_would_run() -> None:
    migrations = find_migrations()
    # A file of several statements is split (one-statement files exist too).
    assert sum(len(m.statements) for m in migrations) > 5 * len(migrations)
    for m in migrations:
        statements = m.statements
        assert statements, m.path.name
        # No statement is cut inside a function body: every dollar quote opened is closed.
        for statement in statements:
            assert statement.count("$$") % 2 == 0, (m.path.name, statement[:200])


# ---------------------------------------------------------------------------
# both orders, with history rows in the CLI's format


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def blank(pg_server) -> AsyncIterator[asyncpg.Connection]:  # type: ignore[no-untyped-def]
    """An empty database of this test's own (no schema, no history)."""
    name = f"kyrie_blank_{uuid.uuid4().hex[:10]}"
    await _admin(pg_server.admin_dsn, f'create database "{name}"')
    conn = await asyncpg.connect(pg_server.dsn_for(name))
    try:
        yield conn
    finally:
        await conn.close()
        await _admin(pg_server.admin_dsn, f'drop database if exists "{name}" with (force)')


CLI_HISTORY_DDL = [  # pkg/migration/history.go, CreateMigrationTable
    "CREATE SCHEMA IF NOT EXISTS supabase_migrations",
    "CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations (version text NOT NULL PRIMARY KEY)",
    "ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS statements text[]",
    "ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS name text",
]


async def push_like_the_cli(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> None:
    """What `supabase db push` does: each file's statements one by one in one
    transaction, then INSERT INTO ... (version, name, statements)."""
    for statement in CLI_HISTORY_DDL:
        await conn.execute(statement)
    for m in find_migrations(sql_dir):
        async with conn.transaction():
            for statement in split_and_trim(m.text):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO supabase_migrations.schema_migrations(version, name, statements)"
                " VALUES($1, $2, $3)",
                m.version, m.name, split_and_trim(m.text),
            )


async def test_cli_first_then_migrate_applies_nothing_and_agrees(blank: asyncpg.Connection) -> None:
    await _apply_standins(blank)
    await push_like_the_cli(blank)
    states = await status(blank)
    assert [(s.applied, s.changed) for s in states] == [(True, False)] * len(find_migrations())
    assert await migrate(blank) == []
    assert await blank.fetchval("select count(*) from supabase_migrations.schema_migrations") == len(states)


async def test_migrate_first_writes_the_rows_the_cli_writes(db: asyncpg.Connection) -> None:
    rows = await db.fetch("select version, name, statements from supabase_migrations.schema_migrations")
    assert {r["version"]: (r["name"], list(r["statements"])) for r in rows} == {
        m.version: (m.name, split_and_trim(m.text)) for m in find_migrations()
    }
    # The CLI's history check is by version: every local file is remote, nothing to push.
    local = {m.version for m in find_migrations()}
    assert local == {r["version"] for r in rows}


async def test_rows_of_earlier_kyrie_engine_versions_are_still_recognised(db: asyncpg.Connection) -> None:
    """Before 0.1.1 `migrate` stored the whole file as one statement; a deployed database keeps those."""
    for m in find_migrations():
        await db.execute(
            "update supabase_migrations.schema_migrations set statements = array[$2] where version = $1",
            m.version, m.text,
        )
    assert await migrate(db) == []
    assert not any(s.changed for s in await status(db))


async def test_a_file_edited_after_the_cli_applied_it_is_refused_naming_it(
    blank: asyncpg.Connection, tmp_path: Path
) -> None:
    await _apply_standins(blank)
    await push_like_the_cli(blank)
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    edited = sorted(sql_dir.glob("2*.sql"))[3]
    edited.write_text(edited.read_text().replace("between 1 and 1000", "between 1 and 9"))
    assert edited.read_text() != (SQL_DIR / edited.name).read_text()
    marks = {s.migration.path.name: s.changed for s in await status(blank, sql_dir)}
    assert [name for name, changed in marks.items() if changed] == [edited.name]
    with pytest.raises(MigrationError, match=rf"^{edited.name} was changed after it was applied"):
        await migrate(blank, sql_dir)


async def _apply_standins(conn: asyncpg.Connection) -> None:
    from kyrie_engine.migrate import apply_standins

    await apply_standins(conn)


# ---------------------------------------------------------------------------
# the command: --status, --export


async def cli(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kyrie_engine.cli", "migrate", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )


async def test_status_after_the_cli_pushed_lists_every_file_applied(
    blank: asyncpg.Connection, pg_server  # type: ignore[no-untyped-def]
) -> None:
    await _apply_standins(blank)
    await push_like_the_cli(blank)
    dsn = pg_server.dsn_for(await blank.fetchval("select current_database()"))
    result = await cli("--status", dsn=dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [w for m in find_migrations() for w in ("applied", m.path.name)]
    again = await cli(dsn=dsn)
    assert again.returncode == 0, again.stderr
    assert "nothing to apply" in again.stdout


async def test_export_writes_the_migrations_for_the_supabase_cli(tmp_path: Path) -> None:
    target = tmp_path / "supabase" / "migrations"
    first = await cli("--export", str(target))  # no DATABASE_URL needed
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in target.iterdir())
    assert names == [m.path.name for m in find_migrations()]
    assert "supabase_standins.sql" not in names
    for name in names:
        assert (target / name).read_bytes() == (SQL_DIR / name).read_bytes()

    second = await cli("--export", str(target))
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("unchanged") == len(names)


async def test_export_leaves_a_differing_file_untouched_and_fails_naming_it(tmp_path: Path) -> None:
    target = tmp_path / "migrations"
    target.mkdir()
    theirs = target / find_migrations()[1].path.name
    theirs.write_text("-- the project's own edit\n")
    result = await cli("--export", str(target))
    assert result.returncode == 1
    assert theirs.name in result.stderr and "left untouched" in result.stderr
    assert theirs.read_text() == "-- the project's own edit\n"
    assert len(list(target.iterdir())) == len(find_migrations())  # the others were written


async def test_status_of_an_edited_file_says_changed_and_exits_1(
    db: asyncpg.Connection, pg_server  # type: ignore[no-untyped-def]
) -> None:
    """A deploy script can gate on `migrate --status`."""
    first = find_migrations()[0]
    await db.execute(
        "update supabase_migrations.schema_migrations set statements = array['select 1'] where version = $1",
        first.version,
    )
    result = await cli("--status", dsn=pg_server.dsn_for(await db.fetchval("select current_database()")))
    assert result.returncode == 1
    assert f"changed  {first.path.name}" in result.stdout
