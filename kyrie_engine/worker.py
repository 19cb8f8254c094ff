"""The worker: claims jobs, runs their handlers, and never loses one.

One asyncio process, four loops:

- claim (the main loop): when it has free slots, claims a batch with
  `kyrie.claim_jobs` (per-kind room included) and starts one task per job;
  then waits for a wake-up (a notification, a freed slot) or the poll
  interval, whichever comes first.
- listen (`listener.Listener`): `kyrie_jobs` wakes the claim loop;
  `kyrie_job_events` wakes it for jobs that become pending again, and cancels
  a running handler whose job was cancelled.
- leases: every `heartbeat_seconds`, one statement extends the leases of all
  jobs held (a job missing from the answer was cancelled or taken over, and
  its handler is stopped); every poll interval, jobs whose worker died go
  back to the queue (`kyrie.reclaim_expired_leases`).
- flush: handlers' outcomes are buffered and written together (all
  completions of a round in one `kyrie.complete_jobs`).  Whatever is buffered
  while a flush runs goes in the next one, so batching adds no waiting.

Every write is fenced by (owner, attempt) in SQL, so any of them may be
retried after a lost connection and a late one after a takeover does
nothing.  Delivery is at least once: a handler whose worker dies runs again
after its lease expires, and sees the attempt number.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias
from uuid import UUID

import asyncpg

from kyrie_engine import queue
from kyrie_engine.db import connect_kwargs, driver_dsn
from kyrie_engine.listener import Listener
from kyrie_engine.queue import ClaimedJob

log = logging.getLogger(__name__)

JOBS_CHANNEL = "kyrie_jobs"
EVENTS_CHANNEL = "kyrie_job_events"

# What a lost connection, a restarting server or a lock conflict looks like:
# wait a little and try again.  Anything else is a bug and is raised.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # asyncpg's "protocol is in the failed state" after a connection died
    # mid-statement; the pool drops that connection on release.
    asyncpg.exceptions.InternalClientError,
)


class RetryLater(Exception):
    """Run this job again after `delay_seconds`; the attempt does not count (a 429, say)."""

    def __init__(self, delay_seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay_seconds}s")
        self.delay_seconds = delay_seconds


class PermanentFailure(Exception):
    """Fail the job now, without retrying (bad input that no retry will fix)."""


class LeaseLost(Exception):
    """This attempt no longer holds its job: it was cancelled or taken over."""


FLUSH_WRITERS = 3  # outcome batches written at once (each on its own connection)
FLUSH_BATCH = 250  # outcomes per statement


@dataclass
class JobContext:
    """What a handler sees of its job."""

    id: UUID
    kind: str
    payload: dict[str, Any]
    workspace_id: UUID | None
    user_id: UUID | None
    attempt: int
    max_attempts: int
    pool: asyncpg.Pool
    _owner: str = field(repr=False)

    async def progress(self, step: str, percent: float | None = None) -> None:
        """Tell followers where the job is (`progress` column, `kyrie_job_events`)."""
        ok = await queue.set_progress(
            self.pool, self.id, self._owner, self.attempt, {"step": step, "percent": percent}
        )
        if not ok:
            raise LeaseLost(f"job {self.id} is no longer held by this attempt")

    async def complete(
        self, conn: asyncpg.Connection, result: Any, usage: dict[str, Any] | None = None
    ) -> None:
        """Complete the job inside the caller's transaction on `conn`, so the
        handler's own rows and the completion commit (or roll back) together.
        Raises LeaseLost (rolling that transaction back, if uncaught) when the
        job was cancelled or taken over meanwhile."""
        if not await queue.complete_job(conn, self.id, self._owner, self.attempt, result, usage):
            raise LeaseLost(f"job {self.id} is no longer held by this attempt")


Handler: TypeAlias = Callable[[JobContext], Awaitable[Any] | Any]

# What became of one attempt, for the flush loop.
Outcome: TypeAlias = (
    tuple[Literal["complete"], Any]
    | tuple[Literal["fail"], str, bool]  # error, retry
    | tuple[Literal["later"], float, str]  # delay, reason
    | tuple[Literal["release"]]  # hand back, attempt not counted
    | tuple[Literal["forget"]]  # nothing to write: cancelled or taken over
)


@dataclass
class _Running:
    job: ClaimedJob
    task: asyncio.Task[None]
    stop_reason: Literal["cancelled", "lost", "shutdown"] | None = None


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _describe(exc: BaseException) -> str:
    """The error operators read in `jobs.error`: the exception, then where it came from."""
    tail = "".join(traceback.format_exception(exc)[-6:])
    # NUL is the one character a Postgres text column refuses.
    return f"{type(exc).__name__}: {exc}\n\n{tail}"[:8000].replace("\x00", "\\0")


class Worker:
    """Runs handlers for the kinds it knows.  `await run()` until `stop()` (or
    SIGTERM/SIGINT); `await run_until_drained()` returns once no job of its
    kinds is due and none of its own is running.

    Concurrency is `concurrency` handlers at once in this process, at most
    `kind_concurrency[kind]` of a kind; `kyrie.job_kind_limits` caps a kind
    across all workers.  A handler taking longer than `timeouts[kind]` (else
    `default_timeout`) is cancelled and its attempt fails.  A handler raising
    RetryLater is rescheduled without using an attempt, at most
    `max_deferrals` times; then its job fails with the last reason.
    """

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int = 10,
        kind_concurrency: Mapping[str, int] | None = None,
        timeouts: Mapping[str, float] | None = None,
        default_timeout: float | None = 900.0,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        poll_seconds: float = 1.0,
        shutdown_grace_seconds: float = 10.0,
        retry_base_seconds: float = 2.0,
        retry_cap_seconds: float = 3600.0,
        max_deferrals: int = 100,
        pool: asyncpg.Pool | None = None,
        pool_size: int = 10,
        worker_id: str | None = None,
        handle_signals: bool = True,
        listen: bool = True,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.dsn = dsn
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        self.kind_concurrency = {k: min(concurrency, n) for k, n in (kind_concurrency or {}).items()}
        self.timeouts = dict(timeouts or {})
        self.default_timeout = default_timeout
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds or lease_seconds / 3
        self.poll_seconds = poll_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.max_deferrals = max_deferrals
        self.pool_size = pool_size
        self.worker_id = worker_id or _default_worker_id()
        self.handle_signals = handle_signals
        self.listen = listen
        self.stats: Counter[str] = Counter()

        self._given_pool = pool
        self._handler_pool: asyncpg.Pool | None = pool
        self._own_pool: asyncpg.Pool | None = None  # the worker's own statements
        self._running: dict[UUID, _Running] = {}
        self._running_by_kind: Counter[str] = Counter()
        self._held: dict[UUID, int] = {}  # job id -> attempt, until its outcome is written
        self._outcomes: list[tuple[UUID, int, Outcome]] = []
        self._outcome_ready: asyncio.Event | None = None
        self._flushing = 0  # outcome batches being written
        self._kick: asyncio.Event | None = None
        self._stopping = False
        self._stop_requested = 0
        self._listener: Listener | None = None
        self._fatal: BaseException | None = None

    # -- public -------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run jobs until stopped; then hand back what is unfinished."""
        await self._serve(drain=False)

    async def run_until_drained(self) -> None:
        """Run until no job of these kinds is due and none of ours is running.
        Jobs scheduled later (run_at, or backing off after a failure) stay queued."""
        await self._serve(drain=True)

    def stop(self) -> None:
        """Stop claiming; let running handlers finish within the grace period,
        then hand the rest back.  A second call skips the grace period."""
        self._stopping = True
        self._stop_requested += 1
        if self._kick is not None:
            self._kick.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def listener_connected(self) -> bool:
        return self._listener is not None and self._listener.connected.is_set()

    # -- lifecycle ----------------------------------------------------------

    async def _serve(self, drain: bool) -> None:
        self._kick = asyncio.Event()
        self._outcome_ready = asyncio.Event()
        self._stopping = self._stop_requested > 0
        kwargs = connect_kwargs(self.dsn)
        # min_size=0: nothing connects here, so a server that is down (or
        # restarting) at start is handled like one that goes down later.
        self._own_pool = await asyncpg.create_pool(
            driver_dsn(self.dsn), min_size=0, max_size=2 + FLUSH_WRITERS, reset=_session_unchanged,
            server_settings={"application_name": f"kyrie-worker:{self.worker_id}"}, **kwargs,
        )
        if self._handler_pool is None:
            self._handler_pool = await asyncpg.create_pool(
                driver_dsn(self.dsn), min_size=0, max_size=self.pool_size,
                server_settings={"application_name": f"kyrie-jobs:{self.worker_id}"}, **kwargs,
            )
        helpers = [
            asyncio.create_task(self._lease_loop(), name="kyrie leases"),
            asyncio.create_task(self._flush_loop(), name="kyrie flush"),
        ]
        for task in helpers:
            task.add_done_callback(self._helper_done)
        if self.listen:
            self._listener = Listener(
                driver_dsn(self.dsn),
                {JOBS_CHANNEL: self._on_jobs, EVENTS_CHANNEL: self._on_event},
                on_connect=self._wake,
                application_name=f"kyrie-listen:{self.worker_id}",
            )
            helpers.append(listen := asyncio.create_task(self._listener.run(), name="kyrie listen"))
            listen.add_done_callback(self._helper_done)
        signals = self._install_signal_handlers() if self.handle_signals else []
        log.info("worker %s started: kinds %s, concurrency %s", self.worker_id, sorted(self.handlers),
                 self.concurrency)
        try:
            await self._claim_loop(drain)
        finally:
            for sig in signals:
                asyncio.get_running_loop().remove_signal_handler(sig)
            await self._shutdown(helpers)
            log.info("worker %s stopped: %s", self.worker_id, dict(self.stats))
        if self._fatal is not None:
            raise RuntimeError(f"worker {self.worker_id} stopped: a helper loop failed") from self._fatal

    def _helper_done(self, task: asyncio.Task[Any]) -> None:
        """A helper loop only ends by cancellation.  If one dies of a bug, the
        worker must not go on claiming jobs it can no longer finish: stop, and
        let `run()` raise.  (Its jobs' leases expire; other workers take over.)"""
        if task.cancelled() or task.exception() is None:
            return
        self._fatal = task.exception()
        log.error("worker %s: %s died", self.worker_id, task.get_name(), exc_info=self._fatal)
        self.stop()

    def _install_signal_handlers(self) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        return installed

    async def _shutdown(self, helpers: list[asyncio.Task[Any]]) -> None:
        self._stopping = True
        # Let running handlers finish, within the grace period (none after a second stop()).
        deadline = time.monotonic() + self.shutdown_grace_seconds
        while self._running and self._stop_requested < 2 and time.monotonic() < deadline:
            tasks = [r.task for r in self._running.values()]
            await asyncio.wait(tasks, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        # Hand back the rest: cancelled with reason "shutdown", their outcome is "release".
        leftover = list(self._running.values())
        for entry in leftover:
            self._stop(entry, "shutdown")
        if leftover:
            await asyncio.wait([e.task for e in leftover], timeout=5)
        # Write every outcome (bounded: if the server is gone, leases expire
        # and other workers take the jobs over; nothing is lost).
        flush_deadline = time.monotonic() + max(5.0, self.lease_seconds / 2)
        while (self._outcomes or self._flushing) and time.monotonic() < flush_deadline:
            assert self._outcome_ready is not None
            self._outcome_ready.set()
            await asyncio.sleep(0.01)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        for pool in (self._own_pool, None if self._given_pool else self._handler_pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 5)
                except TRANSIENT_ERRORS:
                    pool.terminate()
        if self._given_pool is None:
            self._handler_pool = None
        self._own_pool = None

    # -- notifications ------------------------------------------------------

    def _wake(self) -> None:
        if self._kick is not None:
            self._kick.set()

    def _on_jobs(self, _payload: str) -> None:
        self._wake()

    def _on_event(self, payload: str) -> None:
        # Cheap checks first: this sees every status change of every job.
        if '"pending"' in payload:
            self._wake()
        elif '"cancelled"' in payload:
            try:
                job_id = UUID(payload.split('"id": "', 1)[1][:36])
            except (IndexError, ValueError):
                return
            entry = self._running.get(job_id)
            if entry is not None:
                self._stop(entry, "cancelled")

    def _stop(self, entry: _Running, reason: Literal["cancelled", "lost", "shutdown"]) -> None:
        if entry.stop_reason is None and not entry.task.done():
            entry.stop_reason = reason
            entry.task.cancel()

    # -- claim --------------------------------------------------------------

    def _room(self) -> tuple[dict[str, int], int]:
        free = self.concurrency - len(self._running)
        room = {
            kind: min(free, self.kind_concurrency.get(kind, free) - self._running_by_kind[kind])
            for kind in self.handlers
        }
        return {k: n for k, n in room.items() if n > 0}, free

    async def _claim_loop(self, drain: bool) -> None:
        assert self._kick is not None and self._own_pool is not None
        backoff = 0.05
        while not self._stopping:
            self._kick.clear()
            try:
                room, free = self._room()
                wanted = min(free, sum(room.values()))
                # Judged before the claim: an outcome written while the claim
                # runs is not in its snapshot (a retry due now, a kind's room).
                idle = not self._running and not self._held
                claimed = []
                if wanted > 0:
                    claimed = await queue.claim_jobs(self._own_pool, self.worker_id, room, wanted,
                                                     self.lease_seconds)
                backoff = 0.05
            except TRANSIENT_ERRORS as exc:
                log.warning("claim failed (%s); retrying in %.2fs", exc, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for job in claimed:
                self._start(job)
            if wanted and len(claimed) == wanted:
                continue  # a full batch: there may be more
            if drain and idle and not claimed:
                return
            await self._sleep(self.poll_seconds)

    async def _sleep(self, seconds: float) -> None:
        """Until kicked or `seconds` pass."""
        assert self._kick is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._kick.wait()

    def _start(self, job: ClaimedJob) -> None:
        stale = self._running.get(job.id)
        if stale is not None:  # our own earlier attempt, whose lease we lost
            self._stop(stale, "lost")
        assert self._handler_pool is not None
        ctx = JobContext(job.id, job.kind, job.payload, job.workspace_id, job.user_id, job.attempt,
                         job.max_attempts, self._handler_pool, self.worker_id)
        task = asyncio.get_running_loop().create_task(self._run_job(ctx))
        self._running[job.id] = _Running(job, task)
        self._running_by_kind[job.kind] += 1
        self._held[job.id] = job.attempt
        self.stats["claimed"] += 1

    # -- run one ------------------------------------------------------------

    async def _run_job(self, ctx: JobContext) -> None:
        entry = self._running[ctx.id]
        limit = self.timeouts.get(ctx.kind, self.default_timeout)
        outcome: Outcome
        try:
            async with asyncio.timeout(limit) as deadline:
                result = await self._call(self.handlers[ctx.kind], ctx)
            # Encoded once, here: an unencodable result fails its attempt, not the flush.
            encoded = queue.to_json(result)
            outcome = ("complete", None if encoded is None else queue.JsonText(encoded))
        except RetryLater as exc:
            # Bounded like a backoff: run_at must stay a timestamp Postgres can hold.
            delay = exc.delay_seconds if math.isfinite(exc.delay_seconds) else self.retry_cap_seconds
            delay = min(max(delay, 0.0), self.retry_cap_seconds)
            outcome = ("later", delay, str(exc))
        except PermanentFailure as exc:
            outcome = ("fail", _describe(exc), False)
        except LeaseLost:
            outcome = ("forget",)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if entry.stop_reason is None:
                if task is not None and task.cancelling():
                    raise  # not ours: the loop itself is going away
                # The handler raised CancelledError without being cancelled (a
                # library's inner future): an ordinary failure, or the job
                # would stay running, its lease renewed, until the process ends.
                outcome = ("fail", _describe(exc), True)
            else:
                if task is not None:
                    task.uncancel()
                outcome = ("release",) if entry.stop_reason == "shutdown" else ("forget",)
        except TimeoutError as exc:
            if not deadline.expired():
                outcome = ("fail", _describe(exc), True)
            else:
                message = f"TimeoutError: handler for {ctx.kind} ran past its {limit}s timeout"
                outcome = ("fail", message, True)
        except Exception as exc:
            outcome = ("fail", _describe(exc), True)
        finally:
            if self._running.get(ctx.id) is entry:
                del self._running[ctx.id]
            self._running_by_kind[ctx.kind] -= 1
            self._wake()
        if outcome[0] == "fail":
            log.warning("job %s (%s) attempt %d failed: %s", ctx.id, ctx.kind, ctx.attempt,
                        outcome[1].splitlines()[0])
        self._outcomes.append((ctx.id, ctx.attempt, outcome))
        assert self._outcome_ready is not None
        self._outcome_ready.set()

    @staticmethod
    async def _call(handler: Handler, ctx: JobContext) -> Any:
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 (an object with an async __call__)
        ):
            return await handler(ctx)  # type: ignore[misc]
        # A plain function: off the event loop, so it cannot stall the others.
        result = await asyncio.to_thread(handler, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- write outcomes -----------------------------------------------------

    async def _flush_loop(self) -> None:
        """Write outcomes in batches, up to FLUSH_WRITERS at once.

        One writer at a time made the commit of each batch (WAL flush, the
        batch's job-event notifications) the ceiling of a busy worker: the
        handlers had finished long before.  Batches are disjoint (one outcome
        per attempt), so concurrent writers never touch the same row."""
        assert self._outcome_ready is not None
        slots = asyncio.Semaphore(FLUSH_WRITERS)
        writers: set[asyncio.Task[None]] = set()

        async def write(batch: list[tuple[UUID, int, Outcome]]) -> None:
            try:
                await self._write(batch)
            finally:
                self._flushing -= 1
                slots.release()
                self._wake()

        try:
            while True:
                await self._outcome_ready.wait()
                self._outcome_ready.clear()
                while self._outcomes:
                    await slots.acquire()
                    batch, self._outcomes = self._outcomes[:FLUSH_BATCH], self._outcomes[FLUSH_BATCH:]
                    self._flushing += 1
                    task = asyncio.create_task(write(batch))
                    writers.add(task)
                    task.add_done_callback(writers.discard)
                    task.add_done_callback(self._helper_done)  # a bug here stops the worker, loudly
        finally:
            for task in writers:
                task.cancel()

    async def _write(self, batch: list[tuple[UUID, int, Outcome]]) -> None:
        """Write a batch of outcomes, retrying transient errors.  Every call is
        fenced in SQL, so repeating one that did commit changes nothing.

        Any other error is one outcome the database refuses (a NUL character
        in a result, say).  It must not take its batch down with it: the
        jobs would stay running, their leases renewed by our heartbeat, for
        as long as this process lives.  So the batch is written one outcome
        at a time, and the one refused becomes a plain permanent failure."""
        backoff = 0.05
        while True:
            try:
                await self._write_once(batch)
                break
            except TRANSIENT_ERRORS as exc:
                if self._stopping and self._stop_requested > 1:
                    log.warning("gave up writing %d outcome(s) (%s): leases will expire", len(batch), exc)
                    break
                log.warning("writing outcomes failed (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception as exc:
                if len(batch) > 1:
                    for item in batch:
                        await self._write([item])
                    return
                [(job_id, attempt, outcome)] = batch
                log.error("job %s: the database refused its %s outcome", job_id, outcome[0], exc_info=exc)
                refused: Outcome = ("fail", f"{type(exc).__name__}: the job's outcome could not be recorded "
                                    f"({outcome[0]}); see the worker's log", False)
                if outcome != refused:
                    await self._write([(job_id, attempt, refused)])
                    return
                break  # even the plain failure was refused: the lease will expire
        for job_id, attempt, _ in batch:
            # Not if this worker has claimed the job again meanwhile (a retry due
            # at once): that attempt's lease must go on being renewed.
            if self._held.get(job_id) == attempt and job_id not in self._running:
                del self._held[job_id]

    async def _write_once(self, batch: list[tuple[UUID, int, Outcome]]) -> None:
        pool = self._own_pool
        assert pool is not None
        done = [(job_id, attempt, o[1]) for job_id, attempt, o in batch if o[0] == "complete"]
        if done:
            completed = await queue.complete_jobs(pool, self.worker_id, done)
            self.stats["completed"] += len(completed)
        released = {job_id: attempt for job_id, attempt, o in batch if o[0] == "release"}
        if released:
            self.stats["released"] += len(await queue.release_jobs(pool, self.worker_id, released))
        for job_id, attempt, o in batch:
            if o[0] == "fail":
                status = await queue.fail_job(
                    pool, job_id, self.worker_id, attempt, o[1], retry=o[2],
                    base_seconds=self.retry_base_seconds, cap_seconds=self.retry_cap_seconds,
                )
                self.stats["failed" if status == "failed" else "retried"] += status is not None
            elif o[0] == "later":
                status = await queue.retry_later(
                    pool, job_id, self.worker_id, attempt, o[1], o[2], self.max_deferrals
                )
                self.stats["rescheduled" if status == "pending" else "failed"] += status is not None

    # -- leases -------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Heartbeats every `heartbeat_seconds`; every `poll_seconds`, put back
        jobs whose worker died.  Off the claim path, so neither delays a pickup."""
        next_heartbeat = time.monotonic() + self.heartbeat_seconds
        next_reclaim = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, min(next_heartbeat, next_reclaim) - time.monotonic()))
            now = time.monotonic()
            try:
                if now >= next_reclaim:
                    next_reclaim = now + self.poll_seconds
                    await self._reclaim()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_seconds
                    await self._heartbeat()
            except TRANSIENT_ERRORS as exc:
                log.warning("lease upkeep failed (%s); will try again", exc)

    async def _reclaim(self) -> None:
        assert self._own_pool is not None
        reclaimed = await queue.reclaim_expired_leases(self._own_pool)
        if reclaimed:
            self.stats["reclaimed"] += len(reclaimed)
            log.warning("put back %d job(s) whose worker stopped renewing its lease", len(reclaimed))
            self._wake()

    async def _heartbeat(self) -> None:
        held = dict(self._held)
        if not held or self._own_pool is None:
            return
        alive = await queue.heartbeat_jobs(self._own_pool, self.worker_id, held, self.lease_seconds)
        # A job missing from the answer was cancelled or taken over: stop
        # its handler (its outcome is then "forget"; the flush loop lets go).
        for job_id, attempt in held.items():
            entry = self._running.get(job_id)
            if job_id not in alive and entry is not None and entry.job.attempt == attempt:
                self._stop(entry, "lost")


async def _session_unchanged(conn: asyncpg.Connection) -> None:
    """The worker's own statements leave no session state (no SET, no LISTEN,
    transactions closed), so its pool skips asyncpg's RESET ALL round trip."""
