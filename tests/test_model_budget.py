"""The shared Groq budget: its SQL rules, Groq's headers, and three worker processes on one budget.

The SQL tests call the functions as a worker does, on a compressed window
(a "minute" of a few seconds) so that refills are seen without waiting a
minute.  The fleet test runs three real worker processes (production's
handler, the real CrewAI agent) against a fake Groq that enforces RPM and
TPM as Groq does and counts what it serves.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from budget_worker import MODEL, TODAY
from fake_groq import FakeGroq, FakeLimits, running_fake_groq
from queue_support import die_with_parent

from kyrie_engine import queue
from kyrie_engine.agents.budget import RateHeaders, parse_duration
from kyrie_engine.agents.cfo import KIND
from kyrie_engine.seed import seed_studio

WORKER = Path(__file__).with_name("budget_worker.py")


async def take(db: asyncpg.Connection, tokens: int = 100) -> float:
    return float(await db.fetchval("select kyrie.take_model_budget($1, $2)", MODEL, tokens))


async def row(db: asyncpg.Connection) -> asyncpg.Record:
    return await db.fetchrow("select * from kyrie.model_budgets where model = $1", MODEL)


# ---------------------------------------------------------------------------
# the SQL rules (exact buckets: no headroom, except where it is the subject)


@pytest.fixture
async def exact(db: asyncpg.Connection) -> None:
    await db.execute("insert into kyrie.model_budgets (model, headroom) values ($1, 0)", MODEL)


@pytest.mark.usefixtures("exact")
async def test_requests_are_granted_up_to_the_limit_then_the_wait_is_said(db: asyncpg.Connection) -> None:
    await db.execute("select kyrie.seed_model_budget($1, p_rpm => 5, p_window_seconds => 10)", MODEL)
    assert [await take(db) for _ in range(5)] == [0, 0, 0, 0, 0]
    wait = await take(db)
    # One request refills in window / rpm = 2 s; a little of it has passed already.
    assert 1.5 < wait <= 2.0
    assert (await row(db))["requests_left"] < 1  # the refused call took nothing
    for _ in range(5):  # the five were answered (until then they are in flight: see the next test)
        await db.execute("select kyrie.settle_model_call($1, 100, 100)", MODEL)
    await asyncio.sleep(wait + 0.05)
    assert await take(db) == 0


@pytest.mark.usefixtures("exact")
async def test_requests_in_flight_hold_the_refill_back(db: asyncpg.Connection) -> None:
    # Taken but not answered: the provider has not counted them yet, so our
    # bucket must not refill into the room they will take when they land.
    await db.execute("select kyrie.seed_model_budget($1, p_rpm => 4, p_window_seconds => 0.4)", MODEL)
    assert [await take(db) for _ in range(4)] == [0, 0, 0, 0]
    await asyncio.sleep(0.5)  # a whole window: refilled, were nothing in flight
    assert (await db.fetchrow("select in_flight from kyrie.model_budget_status"))["in_flight"] == 4
    assert await take(db) > 0
    await db.execute("select kyrie.settle_model_call($1, 100, 100)", MODEL)
    await asyncio.sleep(0.2)
    assert await take(db) == 0
    # A killed worker never settles: its requests are forgotten after a window and the 60 s timeout.
    await db.execute("update kyrie.model_budgets set in_flight_at = now() - interval '61 seconds'")
    await asyncio.sleep(0.4)
    assert [await take(db) for _ in range(4)] == [0, 0, 0, 0]


@pytest.mark.usefixtures("exact")
async def test_tokens_are_taken_and_corrected_with_the_real_usage(db: asyncpg.Connection) -> None:
    await db.execute("select kyrie.seed_model_budget($1, p_tpm => 1000, p_window_seconds => 60)", MODEL)
    assert await take(db, 600) == 0
    wait = await take(db, 600)  # 400 left, 200 short: 200 tokens refill in 12 s
    assert 11.5 < wait <= 12.0
    # The first call really used 100 tokens: 500 come back, and the second fits.
    await db.execute("select kyrie.settle_model_call($1, 600, 100)", MODEL)
    assert await take(db, 600) == 0
    # A call that used more than its estimate puts the bucket in debt.
    await db.execute("select kyrie.settle_model_call($1, 600, 1900)", MODEL)
    assert (await row(db))["tokens_left"] < 0
    assert await take(db, 1) > 0


@pytest.mark.usefixtures("exact")
async def test_headers_teach_the_limits_and_the_lower_remaining_wins(db: asyncpg.Connection) -> None:
    assert await take(db, 5000) == 0  # nothing known: nothing holds a request back
    await db.execute(
        "select kyrie.settle_model_call($1, 5000, 4000, 1000, 990, 6000, 1500, 86.4, 45.0)", MODEL
    )
    budget = await row(db)
    assert (budget["rpd"], budget["tpm"]) == (1000, 6000)
    assert budget["tokens_left"] == pytest.approx(1500, abs=5)  # Groq's count, not ours
    assert budget["day_requests_left"] == pytest.approx(990, abs=1)
    assert budget["headers_seen_at"] is not None
    assert budget["rpm"] is None  # Groq does not report RPM: only settings know it
    # A worker starting later with settings that say nothing about TPM keeps what was learned.
    await db.execute("select kyrie.seed_model_budget($1, p_rpm => 30)", MODEL)
    assert ((await row(db))["rpm"], (await row(db))["tpm"]) == (30, 6000)


@pytest.mark.usefixtures("exact")
async def test_a_429_blocks_every_worker_until_retry_after(db: asyncpg.Connection) -> None:
    await db.execute("select kyrie.model_rate_limited($1, 7)", MODEL)
    assert 6.5 < await take(db) <= 7.0
    await db.execute("select kyrie.model_rate_limited($1, 1)", MODEL)  # a shorter advice does not shorten it
    assert await take(db) > 6


async def test_headroom_keeps_a_margin_below_the_limit(db: asyncpg.Connection) -> None:
    # The default headroom (5%): the provider counts a request after we take
    # it, and a bucket of ours exactly as full as theirs runs ahead of it.
    await db.execute("select kyrie.seed_model_budget($1, p_rpm => 40, p_window_seconds => 3600)", MODEL)
    waits = [await take(db) for _ in range(40)]
    assert waits.count(0) == 38
    status = await db.fetchrow("select * from kyrie.model_budget_status")
    assert (status["rpm"], status["requests_left"], status["headroom"]) == (40, 0, 0.05)


@pytest.mark.usefixtures("exact")
async def test_concurrent_takers_never_share_the_last_request(db_dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("select kyrie.seed_model_budget($1, p_rpm => 20, p_window_seconds => 3600)", MODEL)
    pool = await asyncpg.create_pool(db_dsn, min_size=10, max_size=10)
    try:
        waits = await asyncio.gather(
            *(pool.fetchval("select kyrie.take_model_budget($1, 10)", MODEL) for _ in range(50))
        )
    finally:
        await pool.close()
    assert sum(1 for w in waits if w == 0) == 20


async def test_the_budget_is_operator_only(db: asyncpg.Connection) -> None:
    for role in ("authenticated", "anon", "service_role"):
        for sql in (
            "select * from kyrie.model_budgets",
            "select * from kyrie.model_budget_status",
            f"select kyrie.take_model_budget('{MODEL}', 1)",
        ):
            async with db.transaction():
                await db.execute(f"set local role {role}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.execute(sql)
    assert await db.fetchval("select count(*) from kyrie.model_budgets") == 0


# ---------------------------------------------------------------------------
# Groq's headers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7.66s", 7.66), ("2m59.56s", 179.56), ("1h2m3s", 3723.0), ("120ms", 0.12), ("2m", 120.0),
     ("", None), ("soon", None), (None, None)],
)
def test_reset_durations_as_groq_writes_them(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_rate_headers_ignore_what_they_cannot_read() -> None:
    headers = httpx.Headers({
        "x-ratelimit-limit-requests": "14400", "x-ratelimit-limit-tokens": "not a number",
        "x-ratelimit-remaining-requests": "14370", "x-ratelimit-remaining-tokens": "-5",
        "x-ratelimit-reset-requests": "2m59.56s", "x-ratelimit-reset-tokens": "7.66s",
    })
    assert RateHeaders.of(headers) == RateHeaders(
        limit_requests=14400, remaining_requests=14370, limit_tokens=None, remaining_tokens=None,
        reset_requests=pytest.approx(179.56), reset_tokens=pytest.approx(7.66),
    )
    assert RateHeaders.of(None) == RateHeaders()


# ---------------------------------------------------------------------------
# three worker processes, one budget

WINDOW = 7.5  # one "minute" of the test
RPM = 30
TPM = 70_000  # with the CFO conversation's ~4.6k tokens, tokens bind about as much as requests
ANALYSES = 60
PROCESSES = 3


@pytest.fixture
def fake() -> Iterator[FakeGroq]:
    with running_fake_groq() as server:
        yield server
    assert not server.script_errors, "\n".join(server.script_errors)


def spawn(dsn: str, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), dsn, url, f"--window={WINDOW}", f"--rpm={RPM}", "--concurrency=4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )


async def test_three_worker_processes_share_one_budget_without_429s(
    db_dsn: str, db: asyncpg.Connection, fake: FakeGroq
) -> None:
    studio = await seed_studio(db, TODAY)
    fake.limit(FakeLimits(rpm=RPM, tpm=TPM, window=WINDOW))
    ids = await queue.enqueue_many(
        db, KIND, [{}] * ANALYSES, workspace_id=studio.workspace_id, user_id=studio.owner_id
    )
    procs = [spawn(db_dsn, fake.url) for _ in range(PROCESSES)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = await db.fetchval(
                "select count(*) from public.jobs where id = any($1) and status in ('completed', 'failed')",
                ids,
            )
            if done == ANALYSES or any(p.poll() is not None for p in procs):
                break
            await asyncio.sleep(0.25)
    finally:
        errors = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                errors.append(p.communicate(timeout=30)[1].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                p.kill()
                errors.append(p.communicate()[1].decode(errors="replace"))
    stderr = "\n".join(e[-3000:] for e in errors)
    statuses = dict(await db.fetch("select status, count(*) from public.jobs group by status"))
    assert statuses == {"completed": ANALYSES}, stderr

    answered = [r for r in fake.requests if r.reply is not None and r.reply.status == 200]
    refused = [r for r in fake.requests if r.reply is not None and r.reply.status == 429]
    assert fake.served[200] == len(answered) == 2 * ANALYSES  # no call paid twice
    # No 429 once the budget knew the limits: only requests sent before the
    # first response's headers were read could have been refused.
    learned = answered[0].at + 0.5
    assert all(r.at < learned for r in refused), [round(r.at - answered[0].at, 2) for r in refused]

    # Throughput: the time the limits need for what was served, over the time it took.
    tokens = sum(int(r.reply.body["usage"]["total_tokens"]) for r in answered if r.reply is not None)
    span = answered[-1].at - answered[0].at
    needed = max((len(answered) - RPM) * WINDOW / RPM, (tokens - TPM) * WINDOW / TPM)
    print(
        f"\n{len(answered)} requests, {tokens} tokens in {span:.1f}s; the limits allow it in {needed:.1f}s "
        f"({needed / span:.0%}); {len(refused)} x 429 before the limits were known"
    )
    assert needed / span >= 0.9, stderr

    # Usage counts every answered token once, per workspace and day.
    usage = await db.fetchrow(
        "select sum(requests) as requests, sum(total_tokens) as tokens from public.workspace_token_usage"
    )
    assert (usage["requests"], usage["tokens"]) == (len(answered), tokens)
