"""Durable model calls: a crashed attempt's answers are replayed, not paid again; usage and who reads it.

The crash is real: a worker PROCESS (tests/budget_worker.py: production's
handler on the fake Groq) is SIGKILLed while the fake Groq holds its third
request; the next attempt runs in this process.  The fake's record of every
request proves what was sent again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from budget_worker import API_KEY, MODEL, TODAY
from fake_groq import FakeGroq, Reply, cfo_brain, completion, rate_limited, running_fake_groq
from queue_support import die_with_parent
from support import add_member, new_user

from kyrie_engine import queue
from kyrie_engine.agents.cfo import KIND, CFOAnalysis, groq_model
from kyrie_engine.seed import SeededWorkspace, seed_studio
from kyrie_engine.worker import Worker

WORKER = Path(__file__).with_name("budget_worker.py")
FAST_WORKER: dict[str, Any] = {
    "handle_signals": False,
    "poll_seconds": 0.2,
    "lease_seconds": 30.0,
    "retry_base_seconds": 0.0,
    "pool_size": 4,
}


@pytest.fixture
def fake() -> Iterator[FakeGroq]:
    with running_fake_groq() as server:
        yield server
    assert not server.script_errors, "\n".join(server.script_errors)


@pytest.fixture
async def studio(db: asyncpg.Connection) -> SeededWorkspace:
    return await seed_studio(db, TODAY)


async def drain(db_dsn: str, fake: FakeGroq) -> None:
    handler = CFOAnalysis(
        groq_model(API_KEY, MODEL, base_url=fake.url, backoff_seconds=0.01, timeout=20.0),
        model_name=MODEL,
        today=lambda: TODAY,
    )
    await Worker(db_dsn, {KIND: handler}, **FAST_WORKER).run_until_drained()


async def enqueue(db: asyncpg.Connection, studio: SeededWorkspace) -> UUID:
    [job_id] = await queue.enqueue_many(
        db, KIND, [{}], workspace_id=studio.workspace_id, user_id=studio.owner_id, max_attempts=3
    )
    return job_id


def held(body: dict[str, Any]) -> Reply:
    """The model's right answer, held back until the test has killed the worker."""
    reply = cfo_brain(body)
    reply.delay = 60.0
    return reply


async def usage_total(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("select coalesce(sum(total_tokens), 0) from public.workspace_token_usage"))


async def test_after_a_sigkill_the_answered_calls_are_replayed_and_each_token_counts_once(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    # Question 1: the tool round, then a report that fails the checks; question 2's first request is held.
    fake.push(cfo_brain, completion("No JSON today."), held)
    job_id = await enqueue(db, studio)
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test then polls, never blocks on it)
        [sys.executable, str(WORKER), db_dsn, fake.url, "--lease=2", "--concurrency=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(fake.requests) >= 3 or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert len(fake.requests) == 3, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    first_attempt = list(fake.requests)
    spent_before = await usage_total(db)
    assert spent_before == sum(  # the two answered calls were counted as they were spent
        r.reply.body["usage"]["total_tokens"] for r in first_attempt[:2] if r.reply is not None
    )

    await asyncio.sleep(2.2)  # the dead worker's lease runs out
    assert len(await db.fetch("select * from kyrie.reclaim_expired_leases()")) == 1
    await drain(db_dsn, fake)

    job = await queue.get_job(db, job_id)
    assert job is not None and job.status == "completed", job and job.error
    assert job.attempts == 2
    again = fake.requests[3:]
    # The answered calls were not sent again; the unanswered one was, unchanged, and then the report.
    assert [r.body for r in again][:1] == [first_attempt[2].body]
    assert all(r.body not in (first_attempt[0].body, first_attempt[1].body) for r in again)
    assert len(again) == 2
    assert fake.served[200] == 4  # the held reply was never delivered

    # Every token once: the view counts what the provider answered, across both attempts.
    answered = [r for r in fake.requests if r is not first_attempt[2] and r.reply and r.reply.status == 200]
    assert await usage_total(db) == sum(r.reply.body["usage"]["total_tokens"] for r in answered if r.reply)
    attempts = await db.fetch("select attempt, count(*) from kyrie.model_usage group by 1 order by 1")
    assert [tuple(r) for r in attempts] == [(1, 2), (2, 2)]
    # The job's own usage is its conversation: the replayed answers and the new ones, once each.
    assert job.usage["total_tokens"] == await usage_total(db)
    assert job.usage["requests"] == 4 and job.result["questions"] == 2


async def test_a_deferred_job_replays_its_answers_and_a_changed_request_goes_out(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    # A 429 after the tool round defers the job (RetryLater, no attempt used); due again at once.
    fake.push(cfo_brain, rate_limited(retry_after="0"))
    job_id = await enqueue(db, studio)
    await drain(db_dsn, fake)
    job = await queue.get_job(db, job_id)
    assert job is not None and job.status == "completed", job and job.error
    # The tool round was answered from the store; only the refused request went out again.
    assert [r.reply.status for r in fake.requests if r.reply] == [200, 429, 200]
    assert fake.requests[2].body == fake.requests[1].body

    # Deferred again, and meanwhile the stored first answer no longer matches its request
    # (as if the data the prompt carries had changed): that request goes out, not the old answer.
    fake.push(cfo_brain, rate_limited(retry_after="30"))
    job_id = await enqueue(db, studio)
    await drain(db_dsn, fake)
    await db.execute(
        "update kyrie.model_calls set request_hash = sha256('other') where job_id = $1 and seq = 0", job_id
    )
    await db.execute("update public.jobs set run_at = now() where id = $1", job_id)
    await db.execute("update kyrie.model_budgets set blocked_until = null")
    await drain(db_dsn, fake)
    job = await queue.get_job(db, job_id)
    assert job is not None and job.status == "completed", job and job.error
    assert [r.reply.status for r in fake.requests[3:] if r.reply] == [200, 429, 200, 200]
    assert fake.requests[5].body == fake.requests[3].body


async def as_user(db: asyncpg.Connection, user: UUID, sql: str) -> list[asyncpg.Record]:
    async with db.transaction():
        await db.execute("set local role authenticated")
        await db.execute(
            "select set_config('request.jwt.claims', $1, true)",
            json.dumps({"sub": str(user), "role": "authenticated"}),
        )
        return await db.fetch(sql)


async def test_usage_is_read_by_owners_and_admins_and_survives_the_purge(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    job_id = await enqueue(db, studio)
    await drain(db_dsn, fake)
    total = await usage_total(db)
    assert total == fake.usage_total("total_tokens") > 0

    admin, outsider = await new_user(db), await new_user(db)
    await add_member(db, studio.workspace_id, admin, "admin")
    member = studio.member_ids[0]
    view = "select workspace_id, sum(total_tokens)::int from public.workspace_token_usage group by 1"
    assert [tuple(r) for r in await as_user(db, studio.owner_id, view)] == [(studio.workspace_id, total)]
    assert [tuple(r) for r in await as_user(db, admin, view)] == [(studio.workspace_id, total)]
    assert await as_user(db, member, view) == []
    assert await as_user(db, outsider, view) == []
    assert await as_user(db, member, "select * from kyrie.model_usage") == []
    # The stored prompts are the operator's alone, whoever asks.
    for user in (studio.owner_id, admin):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_user(db, user, "select * from kyrie.model_calls")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_user(db, user, f"select kyrie.replay_model_call('{job_id}', 0, sha256(''))")
    for role in ("anon", "service_role"):
        async with db.transaction():
            await db.execute(f"set local role {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await db.fetch("select * from public.workspace_token_usage")

    # Retention purges the job and its stored calls; the usage rows stay for billing.
    assert await db.fetchval("select count(*) from kyrie.model_calls") == 2
    assert await db.fetchval("select kyrie.purge_jobs('0 seconds')") == 1
    assert await db.fetchval("select count(*) from kyrie.model_calls") == 0
    assert await usage_total(db) == total
