"""Slot accounting and the executor's error lines (pure, no database); side loops."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from kyrie_engine.worker.executor import summary
from kyrie_engine.worker.slots import Slots

A, B = uuid.uuid4(), uuid.uuid4()


def test_room_is_free_slots_capped_per_kind() -> None:
    slots = Slots(3, ["a", "b"], {"a": 1})
    assert slots.room() == {"a": 1, "b": 3}
    slots.start(A, 1, "a")
    assert slots.room() == {"b": 2}
    slots.start(B, 1, "b")
    assert (slots.free, slots.running, slots.room()) == (1, 2, {"b": 1})


def test_a_finished_attempt_frees_its_slot_but_keeps_its_lease_until_written() -> None:
    slots = Slots(1, ["a"])
    slots.start(A, 1, "a")
    assert slots.room() == {}
    slots.finish(A, 1)
    assert slots.room() == {"a": 1}  # the next claim need not wait for the write
    assert slots.held() == {A: 1} and not slots.idle  # but the lease is still renewed
    slots.let_go(A, 1)
    assert slots.held() == {} and slots.idle


def test_attempts_of_one_job_never_mix() -> None:
    """Our lease was lost and we claimed the job again while the stale attempt stops."""
    slots = Slots(4, ["a"])
    slots.start(A, 1, "a")
    slots.start(A, 2, "a")
    assert slots.held() == {A: 2}  # renew the latest
    slots.finish(A, 1)
    slots.let_go(A, 1)  # the stale attempt's end does not release the new one
    assert slots.is_running(A, 2) and slots.running == 1 and slots.held() == {A: 2}


def test_misuse_is_refused_or_harmless() -> None:
    slots = Slots(2, ["a"])
    slots.start(A, 1, "a")
    with pytest.raises(ValueError, match="already held"):
        slots.start(A, 1, "a")
    slots.let_go(A, 1)  # still running: not let go
    assert slots.is_running(A, 1)
    slots.finish(A, 1)
    slots.finish(A, 1)  # twice: counted once
    assert slots.running == 0
    slots.let_go(B, 7)  # unknown: nothing
    with pytest.raises(ValueError):
        Slots(0, ["a"])


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ValueError("boom"), "ValueError: boom"),
        (TimeoutError(), "TimeoutError"),
        (RuntimeError("\n\n  first line\nsecond line"), "RuntimeError: first line"),
        (FileNotFoundError(2, "No such file", "/srv/kyrie/app/secrets.json"),
         "FileNotFoundError: [Errno 2] No such file: '…'"),
        (ValueError("x" * 1000), "ValueError: " + "x" * 287 + "…"),
        (ValueError("a\x00b"), "ValueError: a\\0b"),
    ],
)
def test_members_read_one_line_without_paths(exc: BaseException, line: str) -> None:
    assert summary(exc) == line


async def test_a_side_loop_is_one_line_and_a_dying_one_stops_the_worker(db_dsn: str) -> None:
    from queue_support import FAST

    from kyrie_engine.worker import Worker

    seen: list[int] = []

    async def side() -> None:
        seen.append(await worker.db.fetchval("select 1"))
        raise RuntimeError("a bug in a side loop")

    async def returns(job: object) -> None:
        return None

    worker = Worker(db_dsn, {"test.kind": returns}, **FAST)
    worker.loops.add("side", side)
    with pytest.raises(RuntimeError, match="a loop failed") as raised:
        await asyncio.wait_for(worker.run(), 30)
    assert seen == [1] and "a bug in a side loop" in str(raised.value.__cause__)
    assert worker.loops.names == ["completer", "leases", "timeouts", "retention", "schedules", "side"]


async def test_a_side_loop_may_return_only_while_the_worker_stops() -> None:
    from kyrie_engine.worker.loops import Loops

    died: list[str] = []
    stopping = False
    loops = Loops(lambda name, exc: died.append(f"{name}: {exc}"), lambda: stopping)
    loops.add("early", lambda: asyncio.sleep(0))
    loops.start()
    await asyncio.sleep(0.05)
    assert died == ["early: the early loop returned"]

    stop = asyncio.Event()
    died.clear()
    loops = Loops(lambda name, exc: died.append(name), lambda: stopping)
    loops.add("until-stopped", stop.wait)
    loops.start()
    stopping = True
    stop.set()  # as the worker's stop() does: retention returns between purges
    await asyncio.sleep(0.05)
    await loops.stop()
    assert died == []


def test_a_second_claim_counts_what_the_first_may_bring_back_as_taken() -> None:
    """Two claims may be in flight with a backlog: neither may ask for slots or
    kind room the other could still fill (no database: nothing connects here)."""
    from kyrie_engine.worker import Worker

    async def handler(job: object) -> None:
        return None

    worker = Worker("postgresql://nobody@127.0.0.1:1/none", {"a": handler, "b": handler}, concurrency=10,
                    kind_concurrency={"a": 4})
    worker.slots.start(A, 1, "b")
    assert worker._room_left(1) == ({"a": 4, "b": 9}, 9)
    worker._in_flight[0] = (6, {"a": 4, "b": 9})  # lane 0 asked for 6, of which up to 4 of kind a
    assert worker._room_left(1) == ({"b": 3}, 3)
    assert worker._room_left(0) == ({"a": 4, "b": 9}, 9)  # a lane's own asking is not subtracted
    worker._in_flight[1] = (3, {"b": 3})
    assert worker._room_left(2) == ({}, 0)


def test_small_workers_claim_in_one_lane() -> None:
    """Two concurrent one-job claims see the same turns and take the same
    workspace's jobs; only workers whose claims can be large get a second lane."""
    from kyrie_engine.worker import Worker
    from kyrie_engine.worker.core import CLAIM_LANES, LANE_MIN_BATCH

    async def handler(job: object) -> None:
        return None

    def lanes(**options: Any) -> int:
        return Worker("postgresql://nobody@127.0.0.1:1/none", {"a": handler}, **options)._lane_count()

    assert lanes(concurrency=2) == 1
    assert lanes(concurrency=500, claim_batch=LANE_MIN_BATCH - 1) == 1
    assert lanes(concurrency=100, kind_concurrency={"a": 4}) == 1  # the kind's limit bounds every claim
    assert lanes(concurrency=500, claim_batch=250) == CLAIM_LANES
