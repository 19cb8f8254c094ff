"""The worker: lifecycle and the claim loop, with its units around it.

    notifier ──► (wake-up, cancel hint) ──► claim loop ──► executor (one task per attempt)
                                                │                 │ Outcome
                        slots (pure accounting) ┘                 ▼
                        lease keeper (heartbeats, reclaim)    completer (batched writes)

- claim loop (here): when there are free slots, claims up to `claim_batch`
  jobs with `kyrie.claim_jobs` (per-kind room included) and starts one
  executor task per job; then waits for a wake-up (a notification, a freed
  slot) or the poll interval, whichever comes first.  One claim is in
  flight at a time, two while there is a backlog and a claim may take
  `LANE_MIN_BATCH` jobs or more (`CLAIM_LANES`).
- executor (`executor.py`): runs one attempt, returns an `Outcome`.
- completer (`completer.py`): writes outcomes in batches.
- lease keeper (`leases.py`): heartbeats, cancel confirmation, reclaim.
- side loops (`loops.py`): the completer and lease keeper run as named,
  supervised loops; more can be added the same way.

Every write is fenced by (owner, attempt) in SQL, so any of them may be
retried after a lost connection, and a late one after a takeover does
nothing.  Delivery is at least once: a handler whose worker dies runs again
after its lease expires, and sees the attempt number.

Nothing waits forever: every pool has a command timeout, and `stop()` is
honoured within the grace period plus a few seconds even while a database
call hangs (what is left then is abandoned; its leases expire and other
workers take the jobs over).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

import asyncpg

from kyrie_engine import notifier as notifications
from kyrie_engine import queue, retention, schedules
from kyrie_engine.context import JobContext
from kyrie_engine.db import BoundedPool, connect_kwargs, driver_dsn, session_unchanged
from kyrie_engine.notifier import JobChanged, NewJobs
from kyrie_engine.outages import COMMAND_TIMEOUT, TRANSIENT_ERRORS, Backoff, Outage
from kyrie_engine.queue import ClaimedJob
from kyrie_engine.worker.completer import Completer
from kyrie_engine.worker.executor import Attempt, Handler, execute, is_async
from kyrie_engine.worker.leases import LeaseKeeper
from kyrie_engine.worker.loops import Loops
from kyrie_engine.worker.outcomes import Ended, Failed
from kyrie_engine.worker.slots import Slots

log = logging.getLogger("kyrie_engine.worker")

FLUSH_WRITERS = 3  # outcome batches written at once (each on its own connection)
FLUSH_BATCH = 250  # outcomes per statement
# Claims in flight at once while there is a backlog (otherwise one): the
# claim is a worker's one serial statement, and with a backlog of short jobs
# the database sat partly idle while it ran (measured: a quarter to a half
# of the CPU idle).  A second claim takes what the first leaves: SKIP LOCKED
# keeps them apart, and each counts the other's asking as taken (`_room_left`).
CLAIM_LANES = 2
# ... but only for workers whose claims can be this large.  Two concurrent
# claims of one or two jobs each see the same turns and take the same
# workspace's next jobs (seen: a lead of 3 between two alternating backlogs
# at concurrency 2); a batch claim spreads itself over the workspaces, so two
# of them stay as fair as one.  And a claim of a few jobs is not what keeps
# such a worker's slots empty.
LANE_MIN_BATCH = 16
# After the grace period: how long stopping may still take, in all (handlers
# cancelled, hand-backs written, pools closed), whatever the database does.
STOP_BUDGET_SECONDS = 3.0
# Handlers' queries may be long (an analysis over a year of worklogs), but
# not endless: a silent connection must end in an error, not a hung attempt.
HANDLER_COMMAND_TIMEOUT = 60.0


def _new_worker_id() -> str:
    """Opaque: it is written in `jobs.lease_owner`, which members can read.
    Who it is (host, pid) is in kyrie.workers, for operators."""
    return f"w-{uuid.uuid4().hex[:16]}"


class Worker:
    """Runs handlers for the kinds it knows.  `await run()` until `stop()`;
    `await run_until_drained()` returns once no job of its kinds is due and
    none of its own is running.  `await ready()` returns once it listens and
    has made its first claim.

    Concurrency is `concurrency` handlers at once in this process, at most
    `kind_concurrency[kind]` of a kind; `kyrie.job_kind_limits` caps a kind
    across all workers.  A claim takes at most `claim_batch` jobs (default:
    `concurrency`).  One claim is in flight at a time, so for jobs much
    shorter than a claim (hundreds of slots, millisecond handlers) half of
    `concurrency` is faster: a claim of every slot leaves the database idle
    while that batch's handlers run, and the handlers idle while the next
    claim runs; with halves, one half runs while the next is claimed
    (measured, 500 slots, no-op jobs: 12,100 against 7,700 jobs/s, medians
    of 3).  A handler taking longer than `timeouts[kind]` (else
    `default_timeout`) is cancelled and its attempt fails.  A handler raising
    RetryLater is rescheduled without using an attempt, at most
    `max_deferrals` times; then its job fails with the last reason.

    Schedules: every worker enqueues the due slots of `kyrie.schedules`
    (whatever their kinds; each slot once across all workers), re-reading
    them every `schedules_poll_seconds`, unless `run_schedules=False`.

    Connections: given a `pool`, the worker uses it for its statements and
    its handlers and opens only its LISTEN connection (shared with anything
    else in the process listening to the same database).  Otherwise it opens
    small pools of its own, lazily.

    Signals: left alone unless `handle_signals=True`, which makes SIGTERM and
    SIGINT call `stop()` while `run()` runs and restores the previous
    handlers afterwards.
    """

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int = 10,
        claim_batch: int | None = None,
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
        handle_signals: bool = False,
        listen: bool = True,
        command_timeout: float = COMMAND_TIMEOUT,
        keep_completed: dt.timedelta | None = retention.KEEP_COMPLETED,
        keep_failed: dt.timedelta | None = retention.KEEP_FAILED,
        run_schedules: bool = True,
        schedules_poll_seconds: float = schedules.POLL_SECONDS,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        for kind in handlers:
            # At registration, not at the first enqueue: a handler for a kind
            # the jobs table refuses would wait forever for a job.
            queue.check_kind(kind)
        if claim_batch is not None and claim_batch < 1:
            raise ValueError("claim_batch must be at least 1")
        self.dsn = dsn
        self.handlers = dict(handlers)
        self._on_loop = {kind: is_async(h) for kind, h in self.handlers.items()}
        self.slots = Slots(concurrency, self.handlers, kind_concurrency)
        self.concurrency = concurrency
        self.claim_batch = claim_batch or concurrency
        self.timeouts = dict(timeouts or {})
        self.default_timeout = default_timeout
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds or lease_seconds / 3
        self.poll_seconds = poll_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.pool_size = pool_size
        self.worker_id = worker_id or _new_worker_id()
        self.handle_signals = handle_signals
        self.listen = listen
        self.command_timeout = command_timeout
        self.stats: Counter[str] = Counter()

        self._given_pool = pool
        self._pool: asyncpg.Pool | None = pool  # the worker's own statements
        self._bounded: BoundedPool | None = None  # ... through this
        self._handler_pool: asyncpg.Pool | None = pool
        # The running attempt of each job (the latest, should a stale one
        # still be stopping after a lost lease).
        self._attempts: dict[UUID, Attempt] = {}
        self._background: set[asyncio.Future[None]] = set()
        self._kicks = [asyncio.Event() for _ in range(CLAIM_LANES)]  # one per claim lane
        self._in_flight: dict[int, tuple[int, dict[str, int]]] = {}  # lane -> (wanted, room) of its claim
        self._backlog = False
        # Whether a freed slot is worth a claim: the last claim was cut short
        # by the free slots or a kind's room, or came back full.  Otherwise
        # the queue had nothing more for us, and only a notification (or the
        # poll) can change that: claiming at every finished job made three
        # claims per job on a quiet worker, two of them empty.
        self._slot_bound = True
        self._draining = False
        self._ready = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._stop_requested = 0
        self._fatal: BaseException | None = None
        self._notifier: notifications.Notifier | None = None
        self.outage = Outage(log, f"worker {self.worker_id}", on_down=self._refresh_pools,
                             on_back=self._refresh_pools)
        self.completer = Completer(
            self._own_pool, self.worker_id, on_written=self._written, outage=self.outage,
            stats=self.stats, retry_base_seconds=retry_base_seconds, retry_cap_seconds=retry_cap_seconds,
            max_deferrals=max_deferrals, writers=FLUSH_WRITERS, batch_size=FLUSH_BATCH,
        )
        self.leases = LeaseKeeper(
            self._own_pool, self.worker_id, self.slots, self._attempts, kinds=list(self.handlers),
            lease_seconds=lease_seconds, heartbeat_seconds=self.heartbeat_seconds,
            poll_seconds=poll_seconds, outage=self.outage, stats=self.stats, on_reclaimed=self._wake,
        )
        self.loops = Loops(self._loop_died, lambda: self._stopping)
        self.loops.add("completer", self.completer.run)
        self.loops.add("leases", self.leases.run)
        self.loops.add("timeouts", self._enforce_timeouts)
        if keep_completed is not None or keep_failed is not None:
            # It ends between purges when the worker stops (its stop event),
            # or is cancelled with the other side loops.
            self.loops.add("retention", lambda: retention.run(
                self.db, keep_completed, keep_failed, self._stop_event, outage=self.outage))
        if run_schedules:
            # Every worker, for any kinds: the database lets one enqueue each slot.
            self.loops.add("schedules", lambda: schedules.run(
                self.db, poll_seconds=schedules_poll_seconds, outage=self.outage))

    # -- public -------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run jobs until stopped; then hand back what is unfinished."""
        await self._serve(drain=False)

    async def run_until_drained(self) -> None:
        """Run until no job of these kinds is due and none of ours is running.
        Jobs scheduled later (run_at, or backing off after a failure) stay queued."""
        await self._serve(drain=True)

    async def ready(self, within: float | None = None) -> bool:
        """True once the worker listens (if it does) and its first claim is done."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), within)
        return self._ready.is_set()

    def stop(self) -> None:
        """Stop claiming; let running handlers finish within the grace period,
        then hand the rest back.  A second call skips the grace period."""
        self._stopping = True
        self._stop_requested += 1
        if self._stop_requested > 1:
            self.completer.give_up = True
        self._wake()
        self._stop_event.set()

    @property
    def in_flight(self) -> int:
        return self.slots.running

    @property
    def listener_connected(self) -> bool:
        return self._notifier is not None and self._notifier.connected

    @property
    def notifier(self) -> notifications.Notifier | None:
        return self._notifier

    @property
    def db(self) -> BoundedPool:
        """The worker's own pool, every statement bounded: for side loops
        (`worker.loops.add("retention", lambda: purge_loop(worker.db))`).
        Only while the worker runs."""
        return self._own_pool()

    # -- lifecycle ----------------------------------------------------------

    def _own_pool(self) -> BoundedPool:
        assert self._bounded is not None, "the worker is not running"
        return self._bounded

    async def _open_pools(self) -> None:
        kwargs = connect_kwargs(self.dsn)
        # min_size=0: nothing connects here, so a server that is down (or
        # restarting) at start is handled like one that goes down later.
        # The worker's own statements take milliseconds: a lease must not
        # run out while one of them waits on a silent connection.
        own_timeout = max(1.0, min(self.command_timeout, self.lease_seconds / 3))
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                driver_dsn(self.dsn), min_size=0, max_size=2 + FLUSH_WRITERS, reset=session_unchanged,
                command_timeout=own_timeout,
                server_settings={"application_name": f"kyrie-worker:{self.worker_id}"}, **kwargs,
            )
        # A host's pool is shared with its handlers and its own code: waiting
        # for a connection there is no sign of an outage, so allow longer.
        wait = own_timeout if self._given_pool is None else COMMAND_TIMEOUT
        self._bounded = BoundedPool(self._pool, own_timeout, acquire_timeout=wait)
        if self._handler_pool is None:
            self._handler_pool = await asyncpg.create_pool(
                driver_dsn(self.dsn), min_size=0, max_size=self.pool_size,
                command_timeout=max(self.command_timeout, HANDLER_COMMAND_TIMEOUT),
                server_settings={"application_name": f"kyrie-jobs:{self.worker_id}"}, **kwargs,
            )

    async def _serve(self, drain: bool) -> None:
        # Cleared, not replaced: ready() may already be waiting on them.
        for kick in self._kicks:
            kick.clear()
        self._ready.clear()
        self._stopping = self._stop_requested > 0
        self._draining = drain
        self._slot_bound = True
        if not self._stopping:
            self._stop_event.clear()
        await self._open_pools()
        if self.listen:
            self._notifier = notifications.shared(self.dsn)
            unsubscribe = self._notifier.subscribe(self._on_event, self._on_listen_connect)
            self._notifier.start()
        self.loops.start()
        restore = self._install_signal_handlers() if self.handle_signals else None
        log.info("worker %s started: kinds %s, concurrency %s", self.worker_id, sorted(self.handlers),
                 self.concurrency)
        try:
            claiming = asyncio.create_task(self._claim_loop(drain), name="kyrie claim")
            stopped = asyncio.create_task(self._stopped(), name="kyrie stop")
            await asyncio.wait([claiming, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not claiming.done():
                # Stopping while a claim hangs on a silent connection: a claim
                # cut short may have committed; its jobs' leases expire.
                await asyncio.wait([claiming], timeout=0.5)
            claiming.cancel()
            stopped.cancel()
            # Not `await claiming`: a cancelled query's connection goes back to
            # its pool only once the server confirms the cancel, which a
            # silent server never does.  Closing the pools below ends it.
            await asyncio.wait([claiming], timeout=0.2)
        finally:
            try:
                await self._shutdown()
            finally:
                if restore is not None:
                    restore()
                if self._notifier is not None:
                    unsubscribe()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._notifier.stop(), 0.5)
                    self._notifier = None
                log.info("worker %s stopped: %s", self.worker_id, dict(self.stats))
        if self._fatal is not None:
            raise RuntimeError(f"worker {self.worker_id} stopped: a loop failed") from self._fatal

    async def _stopped(self) -> None:
        await self._stop_event.wait()

    def _loop_died(self, name: str, exc: BaseException) -> None:
        self._fatal = exc
        self.stop()

    def _install_signal_handlers(self) -> Callable[[], None] | None:
        """SIGTERM/SIGINT -> stop(); returns what puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return None
        loop = asyncio.get_running_loop()
        # asyncio keeps its own handlers apart from `signal.getsignal` (which
        # then shows its wake-up trampoline): remember both kinds.
        loop_handlers: dict[int, Any] = getattr(loop, "_signal_handlers", {})
        previous = {sig: (loop_handlers.get(sig), signal.getsignal(sig))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        installed = []
        for sig in previous:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)

        def restore() -> None:
            for sig in installed:
                handle, handler = previous[sig]
                loop.remove_signal_handler(sig)
                if handle is not None:
                    loop.add_signal_handler(sig, handle._callback, *handle._args)
                elif handler is not None:
                    signal.signal(sig, handler)

        return restore

    async def _shutdown(self) -> None:
        self._stopping = True
        # Let running handlers finish, within the grace period (none after a second stop()).
        deadline = time.monotonic() + self.shutdown_grace_seconds
        while self._attempts and self._stop_requested < 2 and time.monotonic() < deadline:
            tasks = [a.task for a in self._attempts.values() if a.task is not None]
            await asyncio.wait(tasks, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        # What is left then has STOP_BUDGET_SECONDS, whatever the database does.
        budget_end = time.monotonic() + STOP_BUDGET_SECONDS
        leftover = list(self._attempts.values())
        for attempt in leftover:
            attempt.stop("shutdown")  # its outcome is then Released
        if leftover:
            await asyncio.wait([a.task for a in leftover if a.task is not None], timeout=1.0)
        # Hand back and write what is buffered; if the server does not answer
        # in time, the leases expire and other workers take the jobs over.
        if not await self.completer.drain(max(0.0, budget_end - time.monotonic() - 0.7)):
            log.warning("worker %s: %d outcome(s) not written before stopping; their leases will expire",
                        self.worker_id, self.completer.pending)
        self.completer.give_up = True
        await self.loops.stop(within=0.3)
        for pool in {self._pool, self._handler_pool} - {None, self._given_pool}:
            assert pool is not None
            try:
                await asyncio.wait_for(pool.close(), max(0.1, budget_end - time.monotonic()))
            except Exception:
                pool.terminate()
        self._pool = self._handler_pool = self._given_pool
        self.completer.give_up = self._stop_requested > 1

    # -- notifications ------------------------------------------------------

    def _wake(self) -> None:
        for kick in self._kicks:
            kick.set()

    def _on_listen_connect(self) -> None:
        self._wake()  # jobs may have been enqueued while nobody listened
        if self._notifier is not None and self._notifier.connections > 1:
            self._refresh_pools()

    def _refresh_pools(self) -> None:
        """After an outage, the pools' idle connections are likely dead: have
        them replaced on next use, so a handler is not handed one."""
        for pool in {self._pool, self._handler_pool} - {None}:
            assert pool is not None
            task = asyncio.ensure_future(pool.expire_connections())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_event(self, event: notifications.Event) -> None:
        if isinstance(event, NewJobs):
            self._wake()
        elif isinstance(event, JobChanged):
            if event.status == "pending":
                self._wake()  # a retry, a hand-back: new work
            elif event.status == "cancelled" and any(i in self._attempts for i in event.ids):
                self.leases.check_soon()  # a hint: the row decides

    async def _enforce_timeouts(self) -> None:
        """Stop attempts past their deadline: one scan every `tick` seconds
        instead of a timer per attempt (a timeout is late by at most a tick)."""
        limits = [t for t in (self.default_timeout, *self.timeouts.values()) if t is not None]
        if not limits:
            await asyncio.Event().wait()  # no limit at all: nothing to do, ever
        tick = min(0.25, min(limits) / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for attempt in list(self._attempts.values()):
                if attempt.deadline is not None and attempt.deadline <= now:
                    attempt.stop("timeout")

    # -- claim --------------------------------------------------------------

    async def _claim_loop(self, drain: bool) -> None:
        if self._notifier is not None:
            await self._notifier.wait_connected(max(self.poll_seconds, 1.0))
        self._in_flight.clear()
        self._backlog = False
        lanes = [asyncio.create_task(self._claim_lane(i, drain), name=f"kyrie claim {i}")
                 for i in range(self._lane_count())]
        try:
            # The first lane decides when a drain is over; the others end only
            # when stopping.  A lane's error is the loop's.
            done, _ = await asyncio.wait(lanes, return_when=asyncio.FIRST_COMPLETED)
            for lane in done:
                lane.result()
        finally:
            for lane in lanes:
                lane.cancel()
            await asyncio.wait(lanes, timeout=0.2)

    def _lane_count(self) -> int:
        return CLAIM_LANES if self._most_per_claim() >= LANE_MIN_BATCH else 1

    def _most_per_claim(self) -> int:
        return min(self.claim_batch, self.concurrency,
                   sum(self.slots.kind_limits.get(k, self.concurrency) for k in self.handlers))

    def _room_left(self, lane: int) -> tuple[dict[str, int], int]:
        """Room per kind and free slots, less what the other lanes' claims in
        flight may still bring back (all they asked for, within their room)."""
        room, free = self.slots.room(), self.slots.free
        for other, (wanted, asked) in self._in_flight.items():
            if other != lane:
                free -= wanted
                room = {k: n - min(wanted, asked.get(k, 0)) for k, n in room.items()}
        return {k: min(n, free) for k, n in room.items() if n > 0 and free > 0}, max(free, 0)

    async def _claim_lane(self, lane: int, drain: bool) -> None:
        backoff = Backoff()
        kick = self._kicks[lane]
        # With a backlog (the last claim was full), claim only once a quarter
        # of a batch is free: claiming each slot as it frees up made a busy
        # worker claim one or two jobs a statement.  Without one, a new job
        # is claimed as soon as it is heard of (by the first lane; the others
        # only help with a backlog).
        enough = max(1, self._most_per_claim() // 4)
        while not self._stopping:
            kick.clear()
            if lane > 0 and not self._backlog:
                await self._sleep(kick, self.poll_seconds)
                continue
            try:
                room, free = self._room_left(lane)
                wanted = min(self.claim_batch, free, sum(room.values()))
                if self._backlog and wanted < enough and self.slots.running:
                    await self._sleep(kick, self.poll_seconds)  # until a finished attempt kicks
                    continue
                # Judged before the claim: an outcome written while the claim
                # runs is not in its snapshot (a retry due now, a kind's room).
                idle = self.slots.idle and not self._in_flight
                claimed = []
                if wanted > 0:
                    self._in_flight[lane] = (wanted, room)
                    try:
                        claimed = await queue.claim_jobs(self._own_pool(), self.worker_id, room, wanted,
                                                         self.lease_seconds)
                    finally:
                        del self._in_flight[lane]
                    self.stats["claims"] += 1
                self.outage.ok()
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                self.outage.failed(exc, "claiming jobs")
                await self._sleep(kick, backoff.next_delay())
                continue
            self._ready.set()
            for job in claimed:
                self._start(job)
            full = bool(wanted) and len(claimed) == wanted
            if wanted:
                self._backlog = full
            self._slot_bound = full or wanted == 0 or len(room) < len(self.handlers)
            if full:
                self._wake()  # a full batch: there may be more, for every lane
                continue
            if drain and lane == 0 and idle and not claimed and not self._in_flight and self.slots.idle:
                return
            await self._sleep(kick, self.poll_seconds)

    async def _sleep(self, kick: asyncio.Event, seconds: float) -> None:
        """Until kicked or `seconds` pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await kick.wait()

    def _start(self, job: ClaimedJob) -> None:
        stale = self._attempts.get(job.id)
        if stale is not None:  # our earlier attempt, whose lease we lost
            stale.stop("lost")
        assert self._handler_pool is not None
        ctx = JobContext(job.id, job.kind, job.payload, job.workspace_id, job.user_id, job.attempt,
                         job.max_attempts, self._handler_pool, self.worker_id)
        self.slots.start(job.id, job.attempt, job.kind)
        attempt = Attempt(ctx)
        self._attempts[job.id] = attempt
        attempt.task = asyncio.get_running_loop().create_task(self._run_attempt(attempt))
        self.stats["claimed"] += 1

    async def _run_attempt(self, attempt: Attempt) -> None:
        ctx = attempt.ctx
        try:
            outcome = await execute(self.handlers[ctx.kind], attempt,
                                    self.timeouts.get(ctx.kind, self.default_timeout), self.retry_cap_seconds,
                                    on_loop=self._on_loop[ctx.kind])
        finally:
            if self._attempts.get(ctx.id) is attempt:
                del self._attempts[ctx.id]
            self.slots.finish(ctx.id, ctx.attempt)
            if self._slot_bound:
                self._wake()
        if isinstance(outcome, Failed):
            log.warning("job %s (%s) attempt %d failed: %s", ctx.id, ctx.kind, ctx.attempt, outcome.error)
        self.completer.put(Ended(ctx.id, ctx.attempt, outcome))

    def _written(self, ended: Ended) -> None:
        self.slots.let_go(ended.job_id, ended.attempt)
        if self._draining and self.slots.idle:
            self._wake()  # run_until_drained returns once nothing is held
