"""`kyrie-engine demo` is the README's first command: it must keep working.

Run as a user runs it (a child process, the console entry point), against the
test's database through DATABASE_URL, so the suite also covers the path
"schema already applied": the migrator applies nothing and the demo goes on.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg


async def test_demo_runs_one_analysis_end_to_end(db_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GROQ_API_KEY", "KYRIE_LLM")}
    env["DATABASE_URL"] = db_dsn
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kyrie_engine.cli", "demo", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=240)
    out = stdout.decode()
    assert child.returncode == 0, out + stderr.decode()
    for expected in ("202 job_id=", "completed", "Totals per currency", "Narrative", "Proposed actions"):
        assert expected in out, out

    conn = await asyncpg.connect(db_dsn)
    try:
        job = await conn.fetchrow("select id, status from public.jobs where kind = 'cfo.analyze'")
        assert job["status"] == "completed"
        linked = await conn.fetchval(
            "select count(*) from public.ai_actions"
            " where job_id = $1 and metadata ->> 'original_job_id' = $1::text",
            job["id"],
        )
        assert linked > 0
        assert str(job["id"]) in out
    finally:
        await conn.close()
