"""The queue's SQL: each state transition, its fencing, its notifications, who may read jobs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid

import asyncpg
import pytest
from queue_support import wait_until
from support import new_user, new_workspace

from kyrie_engine import queue
from kyrie_engine.db import acting_as
from kyrie_engine.migrate import SQL_DIR

OWNER = "test-owner"


async def claim(db: asyncpg.Connection, kinds: dict[str, int], limit: int = 10, owner: str = OWNER,
                lease: float = 30) -> list[queue.ClaimedJob]:
    return await queue.claim_jobs(db, owner, kinds, limit, lease)


# ---------------------------------------------------------------------------
# enqueue


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ({"idempotency_key": "k"}, {"idempotency_key": "k"}, True),
        ({"idempotency_key": "k", "ws": True}, {"idempotency_key": "k", "ws": True}, True),
        ({"idempotency_key": "k", "ws": True}, {"idempotency_key": "k"}, False),  # other workspace
        ({"idempotency_key": "k"}, {"idempotency_key": "k", "kind": "test.other"}, False),
        ({"idempotency_key": "k"}, {"idempotency_key": "j"}, False),
        ({}, {}, False),  # no key: always a new job
    ],
)
async def test_an_idempotency_key_returns_the_existing_job(
    db: asyncpg.Connection, first: dict, second: dict, same: bool
) -> None:
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)

    async def enqueue(spec: dict) -> queue.Enqueued:
        return await queue.enqueue(
            db, spec.get("kind", "test.kind"), {"n": 1},
            workspace_id=workspace if spec.get("ws") else None,
            idempotency_key=spec.get("idempotency_key"),
        )

    a = await enqueue(first)
    b = await enqueue(second)
    assert a.created
    assert (b.id == a.id) is same
    assert b.created is not same


async def test_concurrent_enqueues_with_one_key_create_one_job(pool: asyncpg.Pool) -> None:
    results = await asyncio.gather(
        *(queue.enqueue(pool, "test.kind", {"i": i}, idempotency_key="once") for i in range(20))
    )
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1


async def test_enqueue_many_keeps_order_and_options(db: asyncpg.Connection) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    ids = await queue.enqueue_many(db, "test.kind", [{"n": i} for i in range(5)], priority=3, run_at=later,
                                   max_attempts=2)
    jobs = [await queue.get_job(db, i) for i in ids]
    assert [j.payload["n"] for j in jobs if j] == [0, 1, 2, 3, 4]
    assert {(j.priority, j.run_at, j.max_attempts, j.status) for j in jobs if j} == {(3, later, 2, "pending")}


# ---------------------------------------------------------------------------
# claim


async def test_claims_go_by_priority_then_run_at(db: asyncpg.Connection) -> None:
    now = dt.datetime.now(dt.UTC)
    specs = [("late-low", 0, -1), ("early-low", 0, -3), ("high", 5, -1), ("future-high", 9, +60)]
    ids = {}
    for name, priority, offset in specs:
        ids[name] = (await queue.enqueue(db, "test.kind", {"name": name}, priority=priority,
                                         run_at=now + dt.timedelta(seconds=offset))).id
    order = [j.payload["name"] for j in await claim(db, {"test.kind": 10})]
    assert sorted(order, key=lambda n: ["high", "early-low", "late-low"].index(n)) == order
    assert order == ["high", "early-low", "late-low"]  # future-high is not due yet


async def test_claims_respect_room_per_kind_and_cluster_limits(db: asyncpg.Connection) -> None:
    await queue.enqueue_many(db, "test.a", [{}] * 5)
    await queue.enqueue_many(db, "test.b", [{}] * 5)
    await queue.set_kind_limit(db, "test.b", 3)

    first = await claim(db, {"test.a": 2, "test.b": 2}, limit=10, owner="w1")
    assert sorted(j.kind for j in first) == ["test.a", "test.a", "test.b", "test.b"]
    # Another worker with plenty of room gets only one more test.b: the cap is 3 across workers.
    second = await claim(db, {"test.a": 10, "test.b": 10}, limit=10, owner="w2")
    assert sorted(j.kind for j in second) == ["test.a"] * 3 + ["test.b"]
    assert await claim(db, {"test.b": 10}, owner="w3") == []
    # The overall limit cuts across kinds.
    await queue.set_kind_limit(db, "test.b", None)
    assert len(await claim(db, {"test.b": 10}, limit=1, owner="w3")) == 1


async def test_the_cluster_limit_holds_under_concurrent_claimers(pool: asyncpg.Pool) -> None:
    await queue.enqueue_many(pool, "test.b", [{}] * 30)
    await queue.set_kind_limit(pool, "test.b", 4)
    claimed = await asyncio.gather(
        *(queue.claim_jobs(pool, f"w{i}", {"test.b": 3}, 3, 30) for i in range(8))
    )
    assert sum(len(c) for c in claimed) == 4


async def test_a_claim_starts_an_attempt_under_a_lease(db: asyncpg.Connection) -> None:
    enq = await queue.enqueue(db, "test.kind", {"x": 1}, max_attempts=3)
    [job] = await claim(db, {"test.kind": 1}, lease=30)
    assert (job.id, job.attempt, job.max_attempts, job.payload) == (enq.id, 1, 3, {"x": 1})
    row = await queue.get_job(db, enq.id)
    assert row is not None and row.status == "running" and row.lease_owner == OWNER
    assert row.lease_expires_at and row.started_at
    assert dt.timedelta(seconds=29) < row.lease_expires_at - row.started_at <= dt.timedelta(seconds=30)


# ---------------------------------------------------------------------------
# outcomes, fenced by (owner, attempt)


async def test_only_the_holder_of_an_attempt_may_finish_it(db: asyncpg.Connection) -> None:
    await queue.enqueue(db, "test.kind", {})
    [job] = await claim(db, {"test.kind": 1})
    for owner, attempt in [("intruder", job.attempt), (OWNER, job.attempt + 1)]:
        assert not await queue.complete_job(db, job.id, owner, attempt, {"r": 1})
        assert await queue.fail_job(db, job.id, owner, attempt, "boom") is None
        assert not await queue.retry_later(db, job.id, owner, attempt, 1)
        assert await queue.heartbeat_jobs(db, owner, {job.id: attempt}, 30) == set()
        assert await queue.release_jobs(db, owner, {job.id: attempt}) == set()
    assert await queue.heartbeat_jobs(db, OWNER, {job.id: job.attempt}, 30) == {job.id}
    assert await queue.complete_jobs(db, OWNER, [(job.id, job.attempt, {"r": 2})]) == {job.id}
    # A repeated completion (a retried flush) changes nothing.
    assert await queue.complete_jobs(db, OWNER, [(job.id, job.attempt, {"r": 3})]) == set()
    done = await queue.get_job(db, job.id)
    assert done is not None and (done.status, done.result, done.lease_owner) == ("completed", {"r": 2}, None)


async def test_claims_and_batch_writes_never_scan_the_jobs_table(db: asyncpg.Connection) -> None:
    """Statistics that say nobody holds anything (ANALYZE saw every job pending)
    once planned each batch write as a scan of the whole table joined with
    every id: 86 ms for 500 completions on 20,000 jobs, and growing with the
    table.  pg_stat_xact_user_tables counts this transaction's own scans."""
    await queue.enqueue_many(db, "test.kind", [{}] * 400)
    await queue.enqueue_many(db, "test.kind", [{}] * 50, workspace_id=await new_workspace(
        db, await new_user(db), "scans"))
    await db.execute("analyze public.jobs")

    async def scans(write: object) -> tuple[int, int]:
        async with db.transaction():
            await write  # type: ignore[misc]
            row = await db.fetchrow("select seq_scan, idx_scan from pg_stat_xact_user_tables"
                                    " where relid = 'public.jobs'::regclass")
        return row["seq_scan"], row["idx_scan"]

    claimed: list[queue.ClaimedJob] = []

    async def claim_all() -> None:
        claimed.extend(await claim(db, {"test.kind": 300}, limit=300))

    assert (await scans(claim_all()))[0] == 0
    done, failed, deferred, released = claimed[:100], claimed[100:150], claimed[150:200], claimed[200:250]
    held = {j.id: j.attempt for j in claimed[250:]}
    writes = [
        queue.complete_jobs(db, OWNER, [(j.id, j.attempt, {"ok": True}) for j in done]),
        queue.fail_jobs(db, OWNER, [queue.FailedAttempt(j.id, j.attempt, "boom", None, True)
                                    for j in failed]),
        queue.retry_later_jobs(db, OWNER, [queue.DeferredAttempt(j.id, j.attempt, 5, "later")
                                           for j in deferred]),
        queue.release_jobs(db, OWNER, {j.id: j.attempt for j in released}),
        queue.heartbeat_jobs(db, OWNER, held, 30),
    ]
    for write in writes:
        seq, idx = await scans(write)
        assert (seq, idx > 0) == (0, True)
    counts = await db.fetch("select status, count(*) from public.jobs group by status order by status")
    assert {r["status"]: r["count"] for r in counts} == {"completed": 100, "pending": 300, "running": 50}


async def test_failures_back_off_exponentially_until_max_attempts(db: asyncpg.Connection) -> None:
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=4)
    base = 10.0
    for attempt in range(1, 5):
        await db.execute("update public.jobs set run_at = now() where id = $1", enq.id)
        [job] = await claim(db, {"test.kind": 1})
        assert job.attempt == attempt
        status = await queue.fail_job(db, job.id, OWNER, attempt, f"boom {attempt}", base_seconds=base)
        row = await db.fetchrow("select status, error, run_at - updated_at as delay, finished_at"
                                " from public.jobs where id = $1", enq.id)
        if attempt < 4:
            full = base * 2 ** (attempt - 1)
            assert status == row["status"] == "pending"
            # Equal jitter: between half and all of the exponential delay.
            assert full / 2 <= row["delay"].total_seconds() <= full
            assert row["finished_at"] is None
        else:
            assert status == row["status"] == "failed"
            assert row["finished_at"] is not None
        assert row["error"] == f"boom {attempt}"


async def test_a_permanent_failure_does_not_retry(db: asyncpg.Connection) -> None:
    await queue.enqueue(db, "test.kind", {}, max_attempts=5)
    [job] = await claim(db, {"test.kind": 1})
    assert await queue.fail_job(db, job.id, OWNER, job.attempt, "bad input", retry=False) == "failed"


@pytest.mark.parametrize("how", ["retry_later", "release"])
async def test_retry_later_and_release_give_the_attempt_back(db: asyncpg.Connection, how: str) -> None:
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=1)
    [job] = await claim(db, {"test.kind": 1})
    if how == "retry_later":
        assert await queue.retry_later(db, job.id, OWNER, job.attempt, 60)
    else:
        assert await queue.release_jobs(db, OWNER, {job.id: job.attempt}) == {job.id}
    row = await db.fetchrow("select status, attempts, run_at - now() as wait from public.jobs where id = $1",
                            enq.id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert (row["wait"] > dt.timedelta(seconds=50)) is (how == "retry_later")


async def test_deferrals_are_capped_and_reset_by_an_operator_retry(db: asyncpg.Connection) -> None:
    """RetryLater uses no attempt, so without a cap a job could be deferred forever."""
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=1)
    for expected in ("pending", "pending", "failed"):
        [job] = await claim(db, {"test.kind": 1})
        status = await queue.retry_later(db, job.id, OWNER, job.attempt, 0, "HTTP 429", max_deferrals=2)
        assert status == expected
    row = await db.fetchrow(
        "select status, attempts, deferrals, error from public.jobs where id = $1", enq.id
    )
    assert (row["status"], row["attempts"], row["deferrals"]) == ("failed", 1, 3)
    assert row["error"] == "deferred 3 times without finishing; the last reason: HTTP 429"
    # Not held any more: nothing changes.
    assert await queue.retry_later(db, job.id, OWNER, job.attempt, 0) is None

    await db.fetch("select * from kyrie.retry_job($1)", enq.id)
    row = await db.fetchrow("select status, attempts, deferrals from public.jobs where id = $1", enq.id)
    assert (row["status"], row["attempts"], row["deferrals"]) == ("pending", 0, 0)


@pytest.mark.parametrize(("max_attempts", "after"), [(2, "pending"), (1, "failed")])
async def test_expired_leases_are_reclaimed(db: asyncpg.Connection, max_attempts: int, after: str) -> None:
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=max_attempts)
    [job] = await claim(db, {"test.kind": 1}, lease=0.01)
    await asyncio.sleep(0.05)
    assert await queue.reclaim_expired_leases(db) == [(enq.id, after)]
    row = await queue.get_job(db, enq.id)
    assert row is not None and row.status == after and row.lease_owner is None
    # Members read the job: it says what happened, not which worker it was.
    assert row.error and "stopped responding" in row.error and OWNER not in row.error
    [attempt] = await queue.job_attempts(db, enq.id)
    assert (attempt["attempt"], attempt["worker"], attempt["outcome"]) == (1, OWNER, "lost")
    assert f"lease of {OWNER} expired" in attempt["detail"]
    # The dead worker's late completion is refused.
    assert not await queue.complete_job(db, job.id, OWNER, job.attempt, {})


# ---------------------------------------------------------------------------
# operators


@pytest.mark.parametrize(
    ("state", "cancel_to", "retry_to"),
    [
        ("pending", "cancelled", "pending"),
        ("running", "cancelled", "pending"),
        ("completed", "completed", "completed"),
        ("failed", "failed", "pending"),
    ],
)
async def test_cancel_and_retry_by_state(db: asyncpg.Connection, state: str, cancel_to: str,
                                         retry_to: str) -> None:
    enq = await queue.enqueue(db, "test.kind", {}, max_attempts=1)
    if state != "pending":
        [job] = await claim(db, {"test.kind": 1})
        if state == "completed":
            await queue.complete_job(db, job.id, OWNER, 1, {"ok": True})
        elif state == "failed":
            await queue.fail_job(db, job.id, OWNER, 1, "boom")
    cancelled = await queue.cancel_job(db, enq.id, "operator says no")
    assert cancelled is not None and cancelled.status == cancel_to
    retried = await queue.retry_job(db, enq.id)
    assert retried is not None and retried.status == retry_to
    if retry_to == "pending":
        assert retried.attempts == 0 and retried.finished_at is None


async def test_unknown_jobs_are_none(db: asyncpg.Connection) -> None:
    missing = uuid.uuid4()
    assert await queue.get_job(db, missing) is None
    assert await queue.cancel_job(db, missing) is None
    assert await queue.retry_job(db, missing) is None


async def test_views_show_queue_health(db: asyncpg.Connection) -> None:
    await queue.enqueue_many(db, "test.a", [{}] * 3)
    await queue.enqueue(db, "test.a", {}, run_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    await queue.enqueue(db, "test.b", {}, max_attempts=1)
    [running] = await claim(db, {"test.a": 1}, lease=60)
    [failing] = await claim(db, {"test.b": 1})
    await queue.fail_job(db, failing.id, OWNER, 1, "ValueError: nope")

    stats = {s["kind"]: s for s in await queue.queue_stats(db)}
    assert {k: (s["pending"], s["scheduled"], s["running"], s["failed"]) for k, s in stats.items()} == {
        "test.a": (2, 1, 1, 0),
        "test.b": (0, 0, 0, 1),
    }
    assert stats["test.a"]["oldest_pending_age"] >= dt.timedelta(0)
    [run] = await queue.running_jobs(db)
    assert run["id"] == running.id
    assert dt.timedelta(seconds=50) < run["lease_left"] <= dt.timedelta(seconds=60)
    [failure] = await queue.recent_failures(db)
    assert (failure["id"], failure["status"], failure["error"]) == (failing.id, "failed", "ValueError: nope")


async def test_purge_deletes_only_old_finished_jobs(db: asyncpg.Connection) -> None:
    old = await queue.enqueue(db, "test.kind", {})
    await queue.cancel_job(db, old.id)
    await db.execute("update public.jobs set finished_at = now() - interval '40 days' where id = $1", old.id)
    fresh = await queue.enqueue(db, "test.kind", {})
    assert await queue.purge_jobs(db, dt.timedelta(days=30)) == 1
    assert await queue.get_job(db, old.id) is None and await queue.get_job(db, fresh.id) is not None


# ---------------------------------------------------------------------------
# notifications


async def _listen(dsn: str, channel: str) -> tuple[asyncpg.Connection, list[str]]:
    received: list[str] = []
    conn = await asyncpg.connect(dsn)
    await conn.add_listener(channel, lambda *args: received.append(args[3]))
    return conn, received


async def test_one_wake_up_per_enqueuing_transaction(db_dsn: str, db: asyncpg.Connection) -> None:
    listener, received = await _listen(db_dsn, "kyrie_jobs")
    try:
        async with db.transaction():  # the caller's transaction: the trigger notifies at commit
            for i in range(3):
                await queue.enqueue(db, "test.kind", {"i": i})
            await queue.enqueue_many(db, "test.kind", [{}] * 5)
        await wait_until(lambda: received, 10, what="a notification")
        await queue.enqueue(db, "test.kind", {})  # autocommit: woken after commit instead
        await queue.enqueue_many(db, "test.kind", [{}] * 5)
        await wait_until(lambda: len(received) >= 3, 10, what="three notifications")
        with pytest.raises(RuntimeError):
            async with db.transaction():  # rolled back: nothing to wake anybody for
                await queue.enqueue(db, "test.kind", {})
                raise RuntimeError("roll back")
        await asyncio.sleep(0.3)
        assert received == ["", "", ""]
    finally:
        await listener.close()


async def test_status_and_progress_changes_are_announced(db_dsn: str, db: asyncpg.Connection) -> None:
    listener, received = await _listen(db_dsn, "kyrie_job_events")
    try:
        enq = await queue.enqueue(db, "test.kind", {})
        [job] = await claim(db, {"test.kind": 1})
        await queue.heartbeat_jobs(db, OWNER, {job.id: 1}, 30)  # not a change anybody follows
        await queue.set_progress(db, job.id, OWNER, 1, {"step": "reading", "percent": 10})
        await queue.cancel_job(db, enq.id)
        await wait_until(lambda: len(received) >= 3, 10, what="three events")
        await asyncio.sleep(0.1)
        assert [json.loads(p) for p in received] == [
            {"id": str(enq.id), "status": s} for s in ("running", "running", "cancelled")
        ]
        assert all(len(p) < 80 for p in received)
    finally:
        await listener.close()


async def test_a_statement_announces_its_changes_together(db_dsn: str, db: asyncpg.Connection) -> None:
    """One notification per status and statement (at most 150 ids each), not one per job."""
    listener, received = await _listen(db_dsn, "kyrie_job_events")
    try:
        await queue.enqueue_many(db, "test.kind", [{}] * 400)
        claimed = await claim(db, {"test.kind": 400}, limit=400)
        await queue.complete_jobs(db, OWNER, [(j.id, 1, None) for j in claimed[:3]])
        await queue.heartbeat_jobs(db, OWNER, {j.id: 1 for j in claimed}, 30)  # no change: no event
        await wait_until(lambda: len(received) >= 4, 10, what="four events")
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    events = [json.loads(p) for p in received]
    assert [(e["status"], len(e["ids"])) for e in events] == [
        ("running", 150), ("running", 150), ("running", 100), ("completed", 3)]
    assert {uuid.UUID(i) for e in events[:3] for i in e["ids"]} == {j.id for j in claimed}
    assert events[3]["ids"] == sorted(str(j.id) for j in claimed[:3])
    assert max(len(p) for p in received) < 8000


async def test_every_batch_function_announces_its_rows_by_status(db_dsn: str, db: asyncpg.Connection) -> None:
    """The batch functions announce what they changed (one message per status),
    reclaimed and handed-back jobs included; an UPDATE outside them, as an
    operator's in psql, is announced row by row; a heartbeat by nobody."""
    enqueued = await queue.enqueue_many(db, "test.kind", [{}] * 6)
    jobs = sorted(j.id for j in await claim(db, {"test.kind": 6}, limit=6))
    listener, received = await _listen(db_dsn, "kyrie_job_events")
    try:
        await queue.fail_jobs(db, OWNER, [queue.FailedAttempt(jobs[0], 1, "e", None, True),
                                          queue.FailedAttempt(jobs[1], 1, "e", None, True),
                                          queue.FailedAttempt(jobs[2], 1, "e", None, False)])
        await queue.release_jobs(db, OWNER, {jobs[3]: 1})
        await queue.heartbeat_jobs(db, OWNER, {jobs[4]: 1, jobs[5]: 1}, 30)
        await db.execute("update jobs set lease_expires_at = now() - interval '1 s' where id = any($1)",
                         jobs[4:])
        await queue.reclaim_expired_leases(db)
        # Neither status nor progress: no event.
        await db.execute("update jobs set priority = 3 where id = any($1)", jobs)
        await db.execute("update jobs set status = 'cancelled', finished_at = now() where id = any($1)",
                         jobs[4:])
        await wait_until(lambda: len(received) >= 6, 10, what="six events")
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    events = [json.loads(p) for p in received]
    assert events[:4] == [
        {"ids": [str(jobs[0]), str(jobs[1])], "status": "pending"},
        {"id": str(jobs[2]), "status": "failed"},
        {"id": str(jobs[3]), "status": "pending"},
        {"ids": [str(jobs[4]), str(jobs[5])], "status": "pending"},
    ]
    assert sorted(events[4:], key=lambda e: e["id"]) == [
        {"id": str(jobs[4]), "status": "cancelled"}, {"id": str(jobs[5]), "status": "cancelled"}]
    assert len(enqueued) == 6


# ---------------------------------------------------------------------------
# who reads jobs, and Realtime


@pytest.mark.parametrize(
    ("who", "sees"),
    [("member", True), ("outsider", False), ("anon", False)],
)
async def test_members_read_their_workspace_jobs_and_nobody_writes(
    db: asyncpg.Connection, who: str, sees: bool
) -> None:
    owner = await new_user(db)
    workspace = await new_workspace(db, owner)
    enq = await queue.enqueue(db, "test.kind", {"secret": 1}, workspace_id=workspace, user_id=owner)
    await queue.enqueue(db, "test.system", {})  # no workspace: no API role sees it
    user = {"member": owner, "outsider": await new_user(db), "anon": None}[who]

    if who == "anon":
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(db, user):
                await db.fetch("select id from public.jobs")
    else:
        async with acting_as(db, user):
            ids = [r["id"] for r in await db.fetch("select id from public.jobs")]
        assert ids == ([enq.id] if sees else [])

    writes = [
        ("insert into public.jobs (kind) values ('test.kind')", ()),
        ("update public.jobs set status = 'completed' where id = $1", (enq.id,)),
        ("delete from public.jobs where id = $1", (enq.id,)),
        ("select * from kyrie.enqueue_job('test.kind')", ()),
        ("select * from kyrie.cancel_job($1)", (enq.id,)),
    ]
    for statement, args in writes:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(db, user):
                await db.execute(statement, *args)


async def test_jobs_are_published_with_default_replica_identity(db: asyncpg.Connection) -> None:
    assert await db.fetchval(
        "select exists (select from pg_publication_tables"
        " where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'jobs')"
    )
    identity = await db.fetchval("select relreplident::text from pg_class where oid = 'public.jobs'::regclass"
                                 )
    assert identity == "d"
    # The guarded block of the migration runs again without complaint.
    text = next(SQL_DIR.glob("*_jobs.sql")).read_text()
    block = re.search(r"^do \$\$\n.*?supabase_realtime.*?^\$\$;", text, re.S | re.M)
    assert block is not None
    await db.execute(block.group(0))


async def test_a_status_change_reaches_the_logical_decoding_stream(db: asyncpg.Connection) -> None:
    if await db.fetchval("show wal_level") != "logical":
        pytest.skip("wal_level is not logical on this server: no logical decoding")
    slot = f"kyrie_test_{uuid.uuid4().hex[:8]}"
    await db.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    try:
        enq = await queue.enqueue(db, "test.kind", {})
        await queue.cancel_job(db, enq.id, "stop")
        await db.execute("update public.workspaces set name = name")  # not in the publication
        rows = await db.fetch(
            "select data from pg_logical_slot_get_binary_changes($1, null, null,"
            " 'proto_version', '1', 'publication_names', 'supabase_realtime')",
            slot,
        )
    finally:
        await db.execute("select pg_drop_replication_slot($1)", slot)
    messages = [bytes(r["data"]) for r in rows]
    relations = [m for m in messages if m[:1] == b"R"]
    assert relations and all(b"jobs\x00" in m for m in relations)
    updates = [m for m in messages if m[:1] == b"U"]
    assert any(b"cancelled" in m and str(enq.id).encode() in m for m in updates)
    assert any(m[:1] == b"I" for m in messages)  # the insert too
