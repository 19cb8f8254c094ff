"""The Python API as someone coming from PgQueuer meets it: the mistakes they
make on day one get a clear error at the call, and nothing reaches the table.

PgQueuer takes any entrypoint name and a `bytes` payload; here a kind follows
the table's CHECK and a payload is a JSON object (a dict), so both are checked
before the statement is sent: ValueError for a kind, TypeError for a payload.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from types import MappingProxyType
from typing import Any

import asyncpg
import pytest

import kyrie_engine
from kyrie_engine import queue
from kyrie_engine.worker import Worker

BAD_KINDS = ["SendEmail", "", "1job", "emails send", "émail", "emails\n", "a" * 101, "-x", "x/y", "X.y"]
GOOD_KINDS = ["a", "emails.send", "x:y-z_1", "a" * 100, "cfo.analyze"]


async def _count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("select count(*) from public.jobs"))


@pytest.mark.parametrize("kind", BAD_KINDS)
async def test_a_kind_the_table_refuses_is_a_value_error_naming_the_rule(
    db: asyncpg.Connection, kind: str
) -> None:
    for call in (
        lambda: kyrie_engine.enqueue(db, kind, {}),
        lambda: kyrie_engine.enqueue_many(db, kind, [{}, {}]),
    ):
        with pytest.raises(ValueError, match=r"invalid job kind .* a lowercase letter, then"):
            await call()
    with pytest.raises(ValueError, match="invalid job kind"):
        kyrie_engine.check_kind(kind)  # what a Worker calls when a handler is registered
    assert await _count(db) == 0


async def test_the_python_rule_is_the_tables_check(db: asyncpg.Connection) -> None:
    """Same answer for every kind, asked of the CHECK itself (a raw insert, no Python rule in the way)."""
    definition = await db.fetchval(
        "select pg_get_constraintdef(c.oid) from pg_constraint c"
        " where c.conrelid = 'public.jobs'::regclass and pg_get_constraintdef(c.oid) like '%kind ~%'"
    )
    assert f"^{queue.KIND_PATTERN}$" in definition
    for kind in BAD_KINDS + GOOD_KINDS:
        try:
            async with db.transaction():
                await db.execute("insert into public.jobs (kind) values ($1)", kind)
                raise asyncio.CancelledError  # roll back what was accepted
        except asyncpg.CheckViolationError:
            table_accepts = False
        except asyncio.CancelledError:
            table_accepts = True
        python_accepts = bool(re.fullmatch(queue.KIND_PATTERN, kind))
        assert table_accepts == python_accepts == (kind in GOOD_KINDS), kind


async def test_a_kind_that_is_not_a_string_is_a_type_error(db: asyncpg.Connection) -> None:
    with pytest.raises(TypeError, match="a job kind is a str"):
        await kyrie_engine.enqueue(db, b"emails.send", {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [b'{"to": "a@b.c"}', '{"to": "a@b.c"}', bytearray(b"{}"), ["a@b.c"], 42, None, ("to", "a@b.c")],
    ids=["bytes", "str", "bytearray", "list", "int", "None", "tuple"],
)
async def test_a_payload_that_is_not_a_json_object_is_a_type_error(
    db: asyncpg.Connection, payload: Any
) -> None:
    with pytest.raises(TypeError, match=r"a job payload is a dict \(a JSON object\), not"):
        await kyrie_engine.enqueue(db, "emails.send", payload)
    with pytest.raises(TypeError, match="a job payload is a dict"):
        await kyrie_engine.enqueue_many(db, "emails.send", [{"ok": 1}, payload])
    assert await _count(db) == 0  # the batch's good payload was not sent either


async def test_bytes_are_refused_with_the_way_out(db: asyncpg.Connection) -> None:
    with pytest.raises(TypeError, match=r"json\.loads\(payload\)"):
        await kyrie_engine.enqueue(db, "emails.send", b'{"to": "a@b.c"}')  # type: ignore[arg-type]


async def test_any_mapping_is_stored_as_an_object(db: asyncpg.Connection) -> None:
    job = await kyrie_engine.enqueue(db, "emails.send", MappingProxyType({"to": "a@b.c", "n": 1}))
    row = await db.fetchrow("select jsonb_typeof(payload) as t, payload::text as p from public.jobs")
    assert row["t"] == "object" and json.loads(row["p"]) == {"to": "a@b.c", "n": 1}
    fetched = await kyrie_engine.get_job(db, job.id)
    assert fetched is not None and fetched.payload == {"to": "a@b.c", "n": 1}


# ---------------------------------------------------------------------------
# enqueue_many: per-job keys, priorities, run_at


async def test_a_batch_sent_again_after_a_lost_answer_returns_the_same_ids(pool: asyncpg.Pool) -> None:
    payloads = [{"n": i} for i in range(50)]
    keys = [f"order-{i}" for i in range(50)]
    first = await kyrie_engine.enqueue_many(pool, "emails.send", payloads, idempotency_keys=keys)
    # The commit happened but the answer never arrived: the caller sends the same batch again.
    again = await kyrie_engine.enqueue_many(pool, "emails.send", payloads, idempotency_keys=keys)
    assert again == first and len(set(first)) == 50
    assert await pool.fetchval("select count(*) from public.jobs") == 50


async def test_the_same_batch_sent_twice_at_once_enqueues_it_once(pool: asyncpg.Pool) -> None:
    keys = [f"k{i}" for i in range(200)]
    a, b = await asyncio.gather(
        kyrie_engine.enqueue_many(pool, "emails.send", [{}] * 200, idempotency_keys=keys),
        kyrie_engine.enqueue_many(pool, "emails.send", [{}] * 200, idempotency_keys=keys[::-1]),
    )
    assert a == b[::-1]
    assert await pool.fetchval("select count(*) from public.jobs") == 200


async def test_a_mixed_batch_keeps_order_and_reuses_only_matching_keys(db: asyncpg.Connection) -> None:
    [old] = await kyrie_engine.enqueue_many(db, "emails.send", [{"old": True}], idempotency_keys=["a"])
    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(hours=1)
    ids = await kyrie_engine.enqueue_many(
        db, "emails.send", [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}],
        idempotency_keys=["a", None, "b", "b", None],
        priority=[5, 0, -1, 9, 2],
        run_at=[None, later, None, None, later],
    )
    assert ids[0] == old  # key seen before: that job, unchanged
    assert ids[2] == ids[3]  # the same key twice in one batch: one job
    assert len({ids[1], ids[2], ids[4], old}) == 4
    rows = {r["id"]: r for r in await db.fetch("select id, payload::text, priority, run_at from public.jobs")}
    assert len(rows) == 4
    assert json.loads(rows[old]["payload"]) == {"old": True}
    assert [rows[ids[i]]["priority"] for i in (1, 2, 4)] == [0, -1, 2]
    assert rows[ids[1]]["run_at"] == later and rows[ids[4]]["run_at"] == later
    assert rows[ids[2]]["run_at"] < later


async def test_per_batch_options_still_apply_to_every_job(db: asyncpg.Connection) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    ids = await kyrie_engine.enqueue_many(
        db, "emails.send", [{}] * 3, priority=7, run_at=later, max_attempts=2
    )
    rows = await db.fetch("select priority, run_at, max_attempts from public.jobs where id = any($1)", ids)
    assert {(r["priority"], r["run_at"], r["max_attempts"]) for r in rows} == {(7, later, 2)}


@pytest.mark.parametrize(
    "options",
    [{"idempotency_keys": ["a"]}, {"priority": [1, 2, 3]}, {"run_at": [None]}],
    ids=["keys", "priorities", "run_at"],
)
async def test_per_job_lists_of_the_wrong_length_are_refused(db: asyncpg.Connection, options: Any) -> None:
    with pytest.raises(ValueError, match="items for 2 payloads"):
        await kyrie_engine.enqueue_many(db, "emails.send", [{}, {}], **options)
    assert await _count(db) == 0


async def test_an_empty_batch_is_nothing(db: asyncpg.Connection) -> None:
    assert await kyrie_engine.enqueue_many(db, "emails.send", []) == []


async def test_an_old_release_can_still_call_the_batch_function_it_knows(db: asyncpg.Connection) -> None:
    """A rolling deploy: the previous release's eight-argument call keeps working."""
    ids = await db.fetch(
        "select kyrie.enqueue_jobs('emails.send', array['{}'::jsonb, '{}'::jsonb], null, null, 0, null, null,"
        " true) as id"
    )
    assert len(ids) == 2 and await _count(db) == 2


# ---------------------------------------------------------------------------
# the operator helpers, exported


async def test_list_stats_purge_and_limits_are_exported(db: asyncpg.Connection) -> None:
    await kyrie_engine.enqueue_many(db, "emails.send", [{}] * 3)
    assert [j.kind for j in await kyrie_engine.list_jobs(db, status="pending")] == ["emails.send"] * 3
    [stats] = await kyrie_engine.queue_stats(db)
    assert stats["kind"] == "emails.send" and stats["pending"] == 3
    assert await kyrie_engine.running_jobs(db) == []
    assert await kyrie_engine.recent_failures(db) == []
    await kyrie_engine.set_kind_limit(db, "emails.send", 2)
    assert await db.fetchval("select max_running from kyrie.job_kind_limits where kind = 'emails.send'") == 2
    await kyrie_engine.set_kind_limit(db, "emails.send", None)
    assert await kyrie_engine.purge_jobs(db, dt.timedelta(0)) == 0  # nothing finished yet
    assert set(kyrie_engine.STATUSES) == {"pending", "running", "completed", "failed", "cancelled"}


@pytest.mark.parametrize("kind", ["SendEmail", "send email", "", "a" * 200])
def test_a_worker_refuses_a_handler_for_a_kind_that_can_never_be_enqueued(kind: str) -> None:
    async def handler(job: Any) -> None:
        return None

    with pytest.raises(ValueError, match="kind"):
        Worker("postgresql://u@127.0.0.1/db", {kind: handler})
