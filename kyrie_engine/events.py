"""Live job events for the API's streams: the process's notifier, fanned out by job id.

A follower is woken (an `asyncio.Event`, so memory per follower is constant
however fast its job changes) when its job is said to have changed, and after
every (re)connect of the notifier, because notifications sent while nobody
listened are lost; it then re-reads the job's row.  A notification is a
doorbell, not the news: a burst of changes collapses into one read, and a
forged one costs a read and nothing else.

The LISTEN connection is the process's one (`notifier.shared`): in `serve`
the worker's and the streams' notifications arrive on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from uuid import UUID

from kyrie_engine import notifier
from kyrie_engine.notifier import EVENTS_CHANNEL as CHANNEL
from kyrie_engine.notifier import JobChanged

APPLICATION_NAME = notifier.APPLICATION_NAME  # how the connection shows in pg_stat_activity

__all__ = ["APPLICATION_NAME", "CHANNEL", "Follower", "JobEvents"]


class Follower:
    """One stream's interest in one job."""

    def __init__(self, job_id: UUID) -> None:
        self.job_id = job_id
        self._wake = asyncio.Event()
        self.closed = False

    def wake(self) -> None:
        self._wake.set()

    async def changed(self, within: float | None = None) -> bool:
        """Wait for a wake-up (at most `within` seconds); True if one came: re-read then."""
        try:
            await asyncio.wait_for(self._wake.wait(), within)
        except TimeoutError:
            return False
        self._wake.clear()
        return True


class JobEvents:
    def __init__(
        self,
        dsn: str | None,
        *,
        check_interval: float = 5.0,
        timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._options = {"ping_seconds": check_interval, "timeout": timeout, "max_backoff": max_backoff}
        self._followers: dict[UUID, set[Follower]] = {}
        self._notifier: notifier.Notifier | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        """False when only a transaction pooler was configured: LISTEN cannot work there."""
        return self._dsn is not None

    @property
    def connected(self) -> bool:
        return self._notifier is not None and self._notifier.connected

    @property
    def reconnects(self) -> int:
        """How many times the LISTEN connection has been (re)established."""
        return 0 if self._notifier is None else self._notifier.connections

    @property
    def follower_count(self) -> int:
        return sum(len(s) for s in self._followers.values())

    def start(self) -> None:
        if not self.enabled or self._notifier is not None:
            return
        assert self._dsn is not None
        self._notifier = notifier.shared(self._dsn, **self._options)
        self._unsubscribe = self._notifier.subscribe(self._on_event, self._wake_all)
        self._notifier.start()

    async def stop(self) -> None:
        if self._notifier is not None:
            assert self._unsubscribe is not None
            self._unsubscribe()
            await self._notifier.stop()
            self._notifier = None
        for followers in self._followers.values():
            for follower in followers:
                follower.closed = True
                follower.wake()

    async def wait_connected(self, within: float) -> bool:
        return self._notifier is not None and await self._notifier.wait_connected(within)

    @contextlib.contextmanager
    def follow(self, job_id: UUID) -> Iterator[Follower]:
        """Register before reading the job's state, so no change can fall in between."""
        follower = Follower(job_id)
        self._followers.setdefault(job_id, set()).add(follower)
        try:
            yield follower
        finally:
            followers = self._followers.get(job_id)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._followers[job_id]

    def _on_event(self, event: notifier.Event) -> None:
        if isinstance(event, JobChanged) and self._followers:
            for job_id in event.ids:
                for follower in self._followers.get(job_id, ()):
                    follower.wake()

    def _wake_all(self) -> None:
        for followers in self._followers.values():
            for follower in followers:
                follower.wake()
