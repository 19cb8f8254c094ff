"""Migrations: in order, once, recorded the Supabase CLI's way, never edited."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import pytest

from kyrie_engine.migrate import SQL_DIR, MigrationError, find_migrations, migrate, status


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
