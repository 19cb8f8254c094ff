"""Retention: finished jobs are deleted after their keep period, on by default.

`kyrie.purge_finished_jobs` (20261201000302_retention.sql) deletes one small
batch and lets one caller at a time in (a transaction-scoped advisory lock;
the others get None and go back to sleep), so every worker of a deployment
can run `run()` beside its claim loop without coordinating: a purge soon
after start-up (a process that restarts often still prunes), then every few
minutes, each one looping over batches until the backlog is gone.

A keep period of None keeps those jobs forever (`KYRIE_KEEP_COMPLETED=0`).
Database errors are logged and retried at the next tick: retention must never
stop a worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random

from kyrie_engine.outages import TRANSIENT_ERRORS, Outage, describe
from kyrie_engine.queue import Executor
from kyrie_engine.settings import KEEP_COMPLETED, KEEP_FAILED

__all__ = ["KEEP_COMPLETED", "KEEP_FAILED", "purge", "purge_once", "run"]

log = logging.getLogger(__name__)

BATCH = 1000
# "Within a minute of start-up": spread over 5-45 s so a fleet that starts
# together does not line up (the lock would make all but one skip anyway).
FIRST_DELAY_SECONDS = (5.0, 45.0)
# "At least every ten minutes": five, minus up to a fifth of jitter.
INTERVAL_SECONDS = 300.0
# Between full batches: let the queue's own statements through.
PAUSE_SECONDS = 0.05

async def purge_once(
    executor: Executor, keep_completed: dt.timedelta | None, keep_failed: dt.timedelta | None,
    batch: int = BATCH,
) -> int | None:
    """Delete one batch; how many, or None when another runner holds the purge lock."""
    deleted = await executor.fetchval(
        "select kyrie.purge_finished_jobs($1, $2, $3)", keep_completed, keep_failed, batch
    )
    return None if deleted is None else int(deleted)


async def purge(
    executor: Executor, keep_completed: dt.timedelta | None, keep_failed: dt.timedelta | None,
    *, batch: int = BATCH, pause_seconds: float = PAUSE_SECONDS, stop: asyncio.Event | None = None,
) -> int:
    """Batches until the backlog is gone (a batch comes back short), another
    runner is at it, or `stop` is set; returns how many this caller deleted."""
    if keep_completed is None and keep_failed is None:
        return 0
    total = 0
    while stop is None or not stop.is_set():
        deleted = await purge_once(executor, keep_completed, keep_failed, batch)
        if deleted is None:
            break
        total += deleted
        if deleted < batch:
            break
        await asyncio.sleep(pause_seconds)
    return total


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0))
    except TimeoutError:
        return False
    return True


async def run(
    pool: Executor,
    keep_completed: dt.timedelta | None,
    keep_failed: dt.timedelta | None,
    stop: asyncio.Event,
    *,
    first_delay_seconds: float | None = None,
    interval_seconds: float = INTERVAL_SECONDS,
    batch: int = BATCH,
    outage: Outage | None = None,
) -> None:
    """Purge on a timer until `stop` is set: one more supervised side task of a
    worker (which reports a lost database through its `outage`, once)."""
    if keep_completed is None and keep_failed is None:
        log.info("retention off: finished jobs are kept forever")
        await stop.wait()  # a side loop that returns is taken for a dead one
        return
    # Jitter, not secrecy: the standard generator is what it needs.
    first = random.uniform(*FIRST_DELAY_SECONDS)  # noqa: S311
    delay = first if first_delay_seconds is None else first_delay_seconds
    while not await _stopped_within(stop, delay):
        try:
            deleted = await purge(pool, keep_completed, keep_failed, batch=batch, stop=stop)
        except TRANSIENT_ERRORS as exc:
            if outage is not None:
                outage.failed(exc, "purging finished jobs")
            else:
                log.warning("retention: purge failed (%s); trying again later", describe(exc))
        except Exception as exc:  # a bug, loudly; but retention must never stop a worker
            log.error("retention: purge failed (%s); trying again later", describe(exc), exc_info=exc)
        else:
            if outage is not None:
                outage.ok()
            if deleted:
                log.info("retention: finished jobs purged", extra={"deleted": deleted})
        delay = interval_seconds * random.uniform(0.8, 1.0)  # noqa: S311
