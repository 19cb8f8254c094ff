"""`kyrie-engine bench`: every measurement the issues and the README quote.

Each section is a module here exposing `async def run(dsn: str, quick: bool)
-> dict[str, float | int | str]`: it gets a fresh, migrated database of its
own, prints human-readable lines as it goes, and returns its figures.  `--json`
prints them all as one object (keys are the sections' own, e.g. `jobs_per_s`).
The database is DATABASE_URL's server when set (a fresh database is created
on it per section), otherwise an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from kyrie_engine.migrate import migrate_dsn

SECTIONS = ("rls", "queue", "http", "cfo", "soak", "console")
DEFAULT_SECTIONS = ("rls", "queue", "http", "cfo")  # soak takes minutes: --only soak; console: --only console


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def _fresh_database(admin_dsn: str, migrated: bool = True) -> tuple[str, str]:
    name = f"kyrie_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    dsn = _with_database(admin_dsn, name)
    if migrated:
        await migrate_dsn(dsn)
    return name, dsn


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


async def _run_sections(admin_dsn: str, sections: list[str], quick: bool) -> dict[str, object]:
    figures: dict[str, object] = {}
    for section in sections:
        module = importlib.import_module(f"kyrie_engine.bench.{section}")
        name, dsn = await _fresh_database(admin_dsn)
        print(f"== {section} ==", file=sys.stderr)
        try:
            figures.update(await module.run(dsn, quick))
        finally:
            await _drop_database(admin_dsn, name)
    return figures


async def _run_peers(admin_dsn: str, quick: bool, rounds: int) -> dict[str, object]:
    from kyrie_engine.bench import peers

    async def fresh(migrated: bool) -> tuple[str, str]:
        return await _fresh_database(admin_dsn, migrated)

    async def drop(name: str) -> None:
        await _drop_database(admin_dsn, name)

    return dict(await peers.run_peers(fresh, drop, quick, rounds))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kyrie-engine bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object of all figures on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--peers", action="store_true",
                        help="only the queue, beside PgQueuer and the bare SKIP LOCKED loop (dev group)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --peers; medians are reported")
    args = parser.parse_args(argv)
    if args.peers:
        from kyrie_engine.bench.peers import pgqueuer_version

        if pgqueuer_version() is None:
            print("kyrie-engine bench --peers: PgQueuer is not installed; it is in the dev group "
                  "(`make install`, or `uv sync --group dev`)", file=sys.stderr)
            return 2
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")

    def measure(dsn: str) -> dict[str, object]:
        if args.peers:
            return asyncio.run(_run_peers(dsn, args.quick, max(1, args.rounds)))
        return asyncio.run(_run_sections(dsn, sections, args.quick))

    admin_dsn = os.environ.get("DATABASE_URL")
    if admin_dsn:
        figures = measure(admin_dsn)
    else:
        from kyrie_engine.embedded import EmbeddedPostgres  # the [demo] extra (kyrie_engine.cli checks)

        with EmbeddedPostgres(options={"fsync": "on", "full_page_writes": "on"}) as pg:
            figures = measure(pg.dsn)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    else:
        width = max((len(k) for k in figures), default=0)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0
