"""Live job events: ONE LISTEN connection per process, fanned out by job id.

The queue's SQL sends `{"id": "<uuid>", "status": "..."}` on `kyrie_job_events`
whenever a job's status or progress changes.  A notification is a doorbell, not
the news: a follower woken by it re-reads the job's row, so a burst of changes
collapses into one read and a follower never trusts a stale payload.  A
follower's wake-up is an `asyncio.Event`, so memory per follower is constant
however fast its job changes.

The connection is watched (termination callback plus a periodic `select 1`,
which catches a half-open socket) and re-established with backoff; after every
(re)connect all followers are woken, because notifications sent while nobody
was listening are lost for good and only a re-read catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from uuid import UUID

import asyncpg

from kyrie_engine.db import connect_kwargs, driver_dsn

CHANNEL = "kyrie_job_events"
APPLICATION_NAME = "kyrie-api-events"  # how the connection shows in pg_stat_activity

log = logging.getLogger("kyrie_engine.events")


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
        channel: str = CHANNEL,
        check_interval: float = 5.0,
        timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._check_interval = check_interval
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._followers: dict[UUID, set[Follower]] = {}
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def enabled(self) -> bool:
        """False when only a transaction pooler was configured: LISTEN cannot work there."""
        return self._dsn is not None

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def follower_count(self) -> int:
        return sum(len(s) for s in self._followers.values())

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="kyrie-job-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for followers in self._followers.values():
            for follower in followers:
                follower.closed = True
                follower.wake()

    async def wait_connected(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), within)
        return self._up.is_set()

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

    def _on_notification(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            job_id = UUID(str(json.loads(payload)["id"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed job event", extra={"channel": channel})
            return
        for follower in self._followers.get(job_id, ()):
            follower.wake()

    def _wake_all(self) -> None:
        for followers in self._followers.values():
            for follower in followers:
                follower.wake()

    async def _connect(self) -> asyncpg.Connection:
        assert self._dsn is not None
        connecting = asyncio.ensure_future(
            asyncpg.connect(
                driver_dsn(self._dsn), timeout=self._timeout,
                server_settings={"application_name": APPLICATION_NAME}, **connect_kwargs(self._dsn),
            )
        )
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # Stopped mid-handshake: let the handshake end and close its connection,
            # rather than abandon a socket asyncpg would complain about later.
            with contextlib.suppress(Exception):
                (await asyncio.wait_for(connecting, self._timeout)).terminate()
            raise

    async def _run(self) -> None:
        assert self._dsn is not None
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._on_notification)
                if self.reconnects:
                    log.info("job events listener reconnected")
                self._up.set()
                self.reconnects += 1
                backoff = 0.1
                self._wake_all()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._check_interval)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.execute("select 1"), self._timeout)
                log.warning("job events listener lost its connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "job events listener cannot connect; retrying",
                    extra={"error_type": type(exc).__name__, "retry_in_s": round(backoff, 2)},
                )
            finally:
                self._up.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
