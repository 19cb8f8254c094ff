"""What a handler sees of its job, and how it says what became of it.

Handlers import this module, not the worker: `JobContext` to read their job
and report progress, and three exceptions for the outcomes a return value
cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

from kyrie_engine import queue


class RetryLater(Exception):
    """Run this job again after `delay_seconds`; the attempt does not count (a 429, say)."""

    def __init__(self, delay_seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay_seconds}s")
        self.delay_seconds = delay_seconds


class PermanentFailure(Exception):
    """Fail the job now, without retrying (bad input that no retry will fix)."""


class LeaseLost(Exception):
    """This attempt no longer holds its job: it was cancelled or taken over."""


@dataclass
class JobContext:
    """One attempt of one job, as its handler sees it.

    `pool` is the worker's pool for handlers (the host's, when the worker was
    given one).  After the database comes back from an outage its idle
    connections are replaced, so a handler is not handed a dead one."""

    id: UUID
    kind: str
    payload: dict[str, Any]
    workspace_id: UUID | None
    user_id: UUID | None
    attempt: int
    max_attempts: int
    pool: asyncpg.Pool
    _owner: str = field(repr=False)
    # Set once the handler completed its own job (`complete`): the worker
    # then writes nothing more for this attempt.
    completed: bool = field(default=False, repr=False)

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
        job was cancelled or taken over meanwhile.

        The attempt ends here as far as the worker is concerned: whatever the
        handler returns afterwards is not written.  (Should the caller's
        transaction roll back after this call, the job stays running until
        its lease expires and is then retried: at least once, never lost.)"""
        if not await queue.complete_job(conn, self.id, self._owner, self.attempt, result, usage):
            raise LeaseLost(f"job {self.id} is no longer held by this attempt")
        self.completed = True
