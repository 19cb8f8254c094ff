"""Members see a one-line error and an opaque lease owner; operators see the detail.

Tried the way a member would: through RLS as `authenticated`, as `anon`, and
through the logical decoding stream Supabase Realtime reads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import pytest
from queue_support import FAST, running, wait_until
from support import new_user, new_workspace

from kyrie_engine import queue
from kyrie_engine.db import acting_as
from kyrie_engine.worker import JobContext, Worker

HOST = socket.gethostname()
PROMPT = "SYSTEM: you are the CFO agent. Contracts:\n" + "\n".join(f"- contract {n}" for n in range(50))


def _deep(n: int) -> None:
    if n:
        _deep(n - 1)
    raise RuntimeError(f"the model answered nonsense\n{PROMPT}\nat {os.path.abspath(__file__)}")


async def explodes(job: JobContext) -> None:
    _deep(5)


def leaks(text: str | None) -> list[str]:
    """What of the engine's internals `text` gives away."""
    if not text:
        return []
    found = [word for word in ("Traceback", "contract 7", os.path.dirname(__file__), HOST, f":{os.getpid()}")
             if word in text]
    return found + (["more than one line"] if "\n" in text else [])


def make_worker(dsn: str, handlers: dict[str, Any], **options: Any) -> Worker:
    return Worker(dsn, handlers, **{**FAST, "handle_signals": False, "pool_size": 2, **options})


async def test_members_read_one_line_and_operators_the_detail(db_dsn: str, db: asyncpg.Connection) -> None:
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    enq = await queue.enqueue(db, "test.kind", {}, workspace_id=workspace, user_id=owner, max_attempts=2)
    worker = make_worker(db_dsn, {"test.kind": explodes}, retry_base_seconds=0.01)
    async with running(worker):
        await wait_until(lambda: db.fetchval("select status = 'failed' from public.jobs where id = $1",
                                             enq.id), 30)

    async with acting_as(db, owner):
        row = await db.fetchrow("select * from public.jobs where id = $1", enq.id)
    assert row is not None and row["error"] == "RuntimeError: the model answered nonsense"
    assert leaks(row["error"]) == [] and row["lease_owner"] is None

    # The operators' view: every attempt, with where it failed.
    attempts = await queue.job_attempts(db, enq.id)
    assert [(a["attempt"], a["outcome"], a["worker"]) for a in attempts] == [
        (1, "failed", worker.worker_id), (2, "failed", worker.worker_id)]
    assert all("Traceback" in a["detail"] and "_deep" in a["detail"] for a in attempts)
    host = await db.fetchrow("select hostname, pid from kyrie.workers where id = $1", worker.worker_id)
    assert host is not None and (host["hostname"], host["pid"]) == (HOST, os.getpid())
    # `kyrie-engine jobs show` is an operator's tool: it shows the detail.
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kyrie_engine.cli", "jobs", "show", str(enq.id)],
        env={**os.environ, "DATABASE_URL": db_dsn}, capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "attempt 2: failed" in shown.stdout and "Traceback" in shown.stdout and "_deep" in shown.stdout


@pytest.mark.parametrize("who", ["member", "anon"])
async def test_the_operator_tables_refuse_members_and_anon(db: asyncpg.Connection, who: str) -> None:
    owner = await new_user(db)
    await new_workspace(db, owner)
    await queue.register_worker(db, "w-1", HOST, 1, ["test.kind"])
    user = owner if who == "member" else None
    for table in ("kyrie.job_attempts", "kyrie.workers"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(db, user):
                await db.fetch(f"select * from {table}")
        column = "worker" if table.endswith("attempts") else "hostname"
        for statement in (f"delete from {table}", f"update {table} set {column} = 'x'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with acting_as(db, user):
                    await db.execute(statement)
    calls = ("kyrie.register_worker('w-2', 'evil', 1, '{}')",
             "kyrie.fail_jobs('w', '{}', '{}', '{}', '{}', '{}')")
    for fn in calls:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(db, user):
                await db.execute(f"select {fn}")
    assert await db.fetchval("select count(*) from kyrie.workers") == 1  # nothing changed


async def test_a_running_jobs_lease_owner_names_no_host(db_dsn: str, db: asyncpg.Connection) -> None:
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    started = asyncio.Event()

    async def waits(job: JobContext) -> None:
        started.set()
        await asyncio.sleep(0.5)

    enq = await queue.enqueue(db, "test.kind", {}, workspace_id=workspace, user_id=owner)
    async with running(make_worker(db_dsn, {"test.kind": waits})):
        await asyncio.wait_for(started.wait(), 30)
        async with acting_as(db, owner):
            lease_owner = await db.fetchval("select lease_owner from public.jobs where id = $1", enq.id)
    assert lease_owner is not None and leaks(lease_owner) == [] and lease_owner.startswith("w-")


async def test_the_realtime_stream_carries_no_internals(db_dsn: str, db: asyncpg.Connection) -> None:
    if await db.fetchval("show wal_level") != "logical":
        pytest.skip("wal_level is not logical on this server: no logical decoding")
    slot = f"kyrie_test_{uuid.uuid4().hex[:8]}"
    await db.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    try:
        enq = await queue.enqueue(db, "test.kind", {}, max_attempts=2)
        worker = make_worker(db_dsn, {"test.kind": explodes}, retry_base_seconds=0.01)
        async with running(worker):
            await wait_until(lambda: db.fetchval("select status = 'failed' from public.jobs where id = $1",
                                                 enq.id), 30)
        rows = await db.fetch(
            "select data from pg_logical_slot_get_binary_changes($1, null, null,"
            " 'proto_version', '1', 'publication_names', 'supabase_realtime')",
            slot,
        )
    finally:
        await db.execute("select pg_drop_replication_slot($1)", slot)
    changes = [bytes(r["data"]) for r in rows if bytes(r["data"])[:1] in (b"I", b"U")]
    assert any(b"failed" in m and str(enq.id).encode() in m for m in changes)
    for message in changes:
        text = message.decode("utf-8", errors="replace")
        assert leaks(text.replace("\n", " ")) == [], text
