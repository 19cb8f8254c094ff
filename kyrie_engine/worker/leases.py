"""The lease keeper: renews what this worker holds, confirms cancels, puts back the dead's work.

- Every `heartbeat_seconds`, one statement extends the leases of every
  attempt held (running or with its outcome still to be written) and marks
  the worker alive in kyrie.workers.  An attempt missing from the answer is
  no longer ours (cancelled, or taken over after our lease ran out): its
  handler is stopped.
- A notification that a job we run was cancelled is only a hint: any
  session may send one.  It brings the next heartbeat forward, and the
  heartbeat's answer (the row) decides.  So a forged "cancelled" costs one
  early heartbeat and stops nothing.
- Every `poll_seconds`, jobs whose worker stopped renewing (it died) go back
  to the queue (`kyrie.reclaim_expired_leases`; SKIP LOCKED, so every worker
  may do it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from uuid import UUID

from kyrie_engine import queue
from kyrie_engine.outages import TRANSIENT_ERRORS, Outage
from kyrie_engine.worker.executor import Attempt
from kyrie_engine.worker.slots import Slots

log = logging.getLogger("kyrie_engine.worker")

EARLY_SPACING = 0.2  # seconds between heartbeats brought forward by cancel hints


class LeaseKeeper:
    def __init__(
        self,
        pool: Callable[[], queue.Executor],
        owner: str,
        slots: Slots,
        attempts: dict[UUID, Attempt],
        *,
        kinds: Sequence[str],
        lease_seconds: float,
        heartbeat_seconds: float,
        poll_seconds: float,
        outage: Outage,
        stats: Counter[str],
        on_reclaimed: Callable[[], None],
    ) -> None:
        self._pool = pool
        self.owner = owner
        self.slots = slots
        self.attempts = attempts
        self.kinds = list(kinds)
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self._outage = outage
        self.stats = stats
        self._on_reclaimed = on_reclaimed
        self._soon = asyncio.Event()
        self._registered = False
        self._last_heartbeat = 0.0

    def check_soon(self) -> None:
        """Heartbeat now: something says a job we hold changed hands."""
        self._soon.set()

    async def run(self) -> None:
        next_heartbeat = time.monotonic()
        next_reclaim = time.monotonic()
        while True:
            wait = max(0.0, min(next_heartbeat, next_reclaim) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._soon.wait(), wait)
            if self._soon.is_set():
                # Anyone may send the hint, as often as they like: at most
                # one early heartbeat per EARLY_SPACING seconds.
                await asyncio.sleep(max(0.0, self._last_heartbeat + EARLY_SPACING - time.monotonic()))
            now = time.monotonic()
            try:
                if not self._registered:
                    await queue.register_worker(self._pool(), self.owner, socket.gethostname(), os.getpid(),
                                                self.kinds)
                    self._registered = True
                if self._soon.is_set() or now >= next_heartbeat:
                    self._soon.clear()
                    next_heartbeat = now + self.heartbeat_seconds
                    await self.heartbeat()
                if now >= next_reclaim:
                    next_reclaim = now + self.poll_seconds
                    await self._reclaim()
                self._outage.ok()
            except TRANSIENT_ERRORS as exc:
                self._outage.failed(exc, "renewing leases")
                await asyncio.sleep(min(self.heartbeat_seconds, 1.0))

    async def heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        held = self.slots.held()
        alive = await queue.heartbeat_jobs(self._pool(), self.owner, held, self.lease_seconds)
        self.stats["heartbeats"] += 1
        for job_id, attempt in held.items():
            if job_id not in alive:
                self._lost(job_id, attempt)

    def _lost(self, job_id: UUID, attempt: int) -> None:
        entry = self.attempts.get(job_id)
        if entry is not None and entry.ctx.attempt == attempt:
            entry.stop("lost")

    async def _reclaim(self) -> None:
        reclaimed = await queue.reclaim_expired_leases(self._pool())
        if reclaimed:
            self.stats["reclaimed"] += len(reclaimed)
            log.warning("put back %d job(s) whose worker stopped renewing its lease", len(reclaimed))
            self._on_reclaimed()
