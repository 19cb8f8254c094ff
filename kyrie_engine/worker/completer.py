"""The completer: writes every outcome, in batches, with retries.

Outcomes are buffered as they come and written by up to `writers` batches at
once, each batch as at most one statement per kind of outcome (completions,
failures, deferrals, hand-backs: `complete_jobs`, `fail_jobs`,
`retry_later_jobs`, `release_jobs`).  A batch starts as soon as a writer is
free, so batching adds no waiting: whatever arrives while a batch is written
goes in the next one.  (One writer made each commit's WAL flush the ceiling
of a busy worker; batches are disjoint, so writers never touch one row.)

Every write is fenced by (owner, attempt) in SQL, so a batch that failed on
a lost connection is simply written again, and a late one after a takeover
changes nothing.  A batch the database refuses for another reason (one
outcome it cannot store, a NUL in a result) must not take the others down
with it: the batch is split, and the outcome refused becomes a plain
permanent failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from kyrie_engine import queue
from kyrie_engine.outages import TRANSIENT_ERRORS, Backoff, Outage
from kyrie_engine.worker.outcomes import Completed, Deferred, Ended, Failed, Released

log = logging.getLogger("kyrie_engine.worker")


class Completer:
    def __init__(
        self,
        pool: Callable[[], queue.Executor],
        owner: str,
        *,
        on_written: Callable[[Ended], None],
        outage: Outage,
        stats: Counter[str],
        retry_base_seconds: float,
        retry_cap_seconds: float,
        max_deferrals: int,
        writers: int = 3,
        batch_size: int = 250,
    ) -> None:
        self._pool = pool
        self.owner = owner
        self._on_written = on_written
        self._outage = outage
        self.stats = stats
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.max_deferrals = max_deferrals
        self.batch_size = batch_size
        self._buffer: list[Ended] = []
        self._ready = asyncio.Event()
        self._slots = asyncio.Semaphore(writers)
        self._writing = 0
        self._backoff = Backoff()
        self.give_up = False  # set by a forced stop: leases expire, other workers take over

    @property
    def pending(self) -> int:
        """Outcomes buffered or being written."""
        return len(self._buffer) + self._writing

    def put(self, ended: Ended) -> None:
        self._buffer.append(ended)
        self._ready.set()

    async def run(self) -> None:
        writers: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._buffer:
                    await self._slots.acquire()
                    batch, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size:]
                    self._writing += len(batch)
                    task = asyncio.create_task(self._write(batch))
                    writers.add(task)
                    task.add_done_callback(writers.discard)
        finally:
            for task in writers:
                task.cancel()

    async def drain(self, within: float) -> bool:
        """Wait (at most `within` seconds) until every outcome is written."""
        deadline = time.monotonic() + within
        while self.pending and time.monotonic() < deadline:
            self._ready.set()
            await asyncio.sleep(0.01)
        return not self.pending

    async def _write(self, batch: list[Ended]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._writing -= len(batch)
            self._slots.release()

    async def _settle(self, batch: list[Ended]) -> None:
        """Write `batch`, retrying transient errors, splitting it when refused."""
        while True:
            try:
                await self._write_once(batch)
                self._outage.ok()
                self._backoff.reset()
                break
            except TRANSIENT_ERRORS as exc:
                self._outage.failed(exc, f"writing {len(batch)} outcome(s)")
                if self.give_up:
                    log.warning("gave up writing %d outcome(s): their leases will expire", len(batch))
                    break
                await self._backoff.sleep()
            except Exception as exc:
                if len(batch) > 1:
                    for ended in batch:
                        await self._settle([ended])
                    return
                await self._refused(batch[0], exc)
                return
        for ended in batch:
            self._on_written(ended)

    async def _refused(self, ended: Ended, exc: Exception) -> None:
        log.error("job %s: the database refused its %s outcome", ended.job_id, _verb(ended), exc_info=exc)
        refused = Failed(f"{type(exc).__name__}: the job's outcome could not be recorded "
                         f"({_verb(ended)}); see the worker's log", None, retry=False)
        if ended.outcome != refused:
            await self._settle([Ended(ended.job_id, ended.attempt, refused)])
        else:
            self._on_written(ended)  # even the plain failure was refused: the lease will expire

    async def _write_once(self, batch: list[Ended]) -> None:
        pool = self._pool()
        done, failed, deferred, released = [], [], [], {}
        for e in batch:
            o = e.outcome
            if isinstance(o, Completed):
                done.append((e.job_id, e.attempt, o.result))
            elif isinstance(o, Failed):
                failed.append(queue.FailedAttempt(e.job_id, e.attempt, o.error, o.detail, o.retry))
            elif isinstance(o, Deferred):
                deferred.append(queue.DeferredAttempt(e.job_id, e.attempt, o.delay, o.reason))
            elif isinstance(o, Released):
                released[e.job_id] = e.attempt
        if done:
            # Awaited before `+=`: that reads the counter first, and concurrent
            # writers would overwrite each other's counts.
            completed = await queue.complete_jobs(pool, self.owner, done)
            self.stats["completed"] += len(completed)
        if failed:
            statuses = await queue.fail_jobs(pool, self.owner, failed, base_seconds=self.retry_base_seconds,
                                             cap_seconds=self.retry_cap_seconds)
            for status in statuses.values():
                self.stats["failed" if status == "failed" else "retried"] += 1
        if deferred:
            statuses = await queue.retry_later_jobs(pool, self.owner, deferred, self.max_deferrals)
            for status in statuses.values():
                self.stats["rescheduled" if status == "pending" else "failed"] += 1
        if released:
            handed_back = await queue.release_jobs(pool, self.owner, released)
            self.stats["released"] += len(handed_back)


def _verb(ended: Ended) -> str:
    return {"Completed": "complete", "Failed": "fail", "Deferred": "later", "Released": "release"}.get(
        type(ended.outcome).__name__, "forget")


