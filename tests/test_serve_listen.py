"""`kyrie-engine serve`: the API's event streams and the worker share one LISTEN connection."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from test_service import _start, _stop, _wait_ready


async def _listeners(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select application_name from pg_stat_activity"
                                " where datname = current_database() and query ilike 'listen%'")
        return [r["application_name"] for r in rows]
    finally:
        await conn.close()


def test_serve_opens_one_listen_connection(db_dsn: str) -> None:
    proc, base = _start("serve", db_dsn)
    try:
        _wait_ready(base, proc)
        checks = httpx.get(f"{base}/readyz", timeout=10).json()["checks"]
        listeners = asyncio.run(_listeners(db_dsn))
    finally:
        code, output = _stop(proc)
    assert checks["listener"] is True and checks["worker_listener"] is True
    assert listeners == ["kyrie-listen"], output[-2000:]
    assert code == 0, output[-2000:]
