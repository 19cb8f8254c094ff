"""One LISTEN connection per process and database, shared by everyone who listens.

The worker (new work, cancels) and the API's event streams (a job's changes)
used to hold a LISTEN connection each, with two reconnect loops; `serve`
opened two.  Now each asks `shared(dsn)` for the process's notifier and
subscribes; the first `start()` connects, the last `stop()` disconnects.

Notifications are hints, never the news: a subscriber woken by one re-reads
the row (any session may `pg_notify` anything on these channels, even as
`authenticated`).  They arrive as typed values (`NewJobs`, `JobChanged`),
parsed once here.  Notifications sent while nobody listened are lost for
good, so every (re)connect calls each subscriber's `on_connect`, and they
re-read what they follow.

The connection is watched (termination callback plus a periodic ping with a
timeout, which catches a socket that went silent) and re-established with
backoff, whatever the error: this loop ends only when stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from uuid import UUID

import asyncpg

from kyrie_engine.db import connect_kwargs, driver_dsn
from kyrie_engine.outages import Backoff, Outage

JOBS_CHANNEL = "kyrie_jobs"
EVENTS_CHANNEL = "kyrie_job_events"
APPLICATION_NAME = "kyrie-listen"  # how the connection shows in pg_stat_activity

log = logging.getLogger(__name__)

Status: TypeAlias = Literal["pending", "running", "completed", "failed", "cancelled"]
_STATUSES = frozenset(("pending", "running", "completed", "failed", "cancelled"))


@dataclass(frozen=True, slots=True)
class NewJobs:
    """`kyrie_jobs`: jobs were enqueued (the payload is empty by design)."""


@dataclass(frozen=True, slots=True)
class JobChanged:
    """`kyrie_job_events`: these jobs' status or progress changed (so says someone).

    One statement's changes to one status arrive together (see migration
    20261201000202): `{"id": ..., "status": ...}` for one job,
    `{"ids": [...], "status": ...}` for several."""

    id_texts: tuple[str, ...]  # as sent; parsed by `ids` only for who asks
    status: Status | None  # None: a status we do not know

    @property
    def ids(self) -> tuple[UUID, ...]:
        """The ids, the malformed ones left out.  Parsed on demand: a busy
        worker hears of every job it claims and completes, and made 40,000
        UUIDs per 20,000 jobs to look only at the cancelled ones."""
        ids = []
        for text in self.id_texts:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                ids.append(UUID(text))
        return tuple(ids)


Event: TypeAlias = NewJobs | JobChanged
_NEW_JOBS = NewJobs()


def parse(channel: str, payload: str) -> Event | None:
    """The event a notification announces, or None for one that is malformed."""
    if channel == JOBS_CHANNEL:
        return _NEW_JOBS
    try:
        data = json.loads(payload)
        ids = data["ids"] if "ids" in data else [data["id"]]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    status = data.get("status")
    return JobChanged(tuple(ids), status if status in _STATUSES else None)  # type: ignore[arg-type]


@dataclass(eq=False, slots=True)
class _Subscriber:
    on_event: Callable[[Event], None]
    on_connect: Callable[[], None] | None


class Notifier:
    def __init__(
        self,
        dsn: str,
        *,
        ping_seconds: float = 5.0,
        timeout: float = 5.0,
        max_backoff: float = 2.0,
        application_name: str = APPLICATION_NAME,
    ) -> None:
        self.dsn = dsn
        self.ping_seconds = ping_seconds
        self.timeout = timeout
        self.application_name = application_name
        self.connections = 0  # successful (re)connects so far
        self._backoff = Backoff(0.05, max_backoff)
        self._outage = Outage(log, "notifier")
        self._subscribers: list[_Subscriber] = []
        self._users = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_stopped: Callable[[], None] | None = None

    # -- subscribers ----------------------------------------------------------

    def subscribe(
        self, on_event: Callable[[Event], None], on_connect: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Deliver every event to `on_event` (called on the event loop; keep it
        cheap); returns the function that unsubscribes."""
        sub = _Subscriber(on_event, on_connect)
        self._subscribers.append(sub)
        if on_connect is not None and self.connected:
            on_connect()  # what was missed before this subscription: re-read now

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)

        return unsubscribe

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, within: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), within)
        return self._up.is_set()

    # -- lifecycle (reference counted: one per user) ----------------------------

    def start(self) -> None:
        self._users += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kyrie notifier")

    async def stop(self) -> None:
        """Release one user's hold; the last one closes the connection."""
        self._users = max(0, self._users - 1)
        if self._users or self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._on_stopped is not None:
            self._on_stopped()

    # -- the connection ---------------------------------------------------------

    def _deliver(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        event = parse(channel, payload)
        if event is None:
            log.warning("ignored a malformed notification on %s", channel)
            return
        for sub in tuple(self._subscribers):
            sub.on_event(event)

    async def _connect(self) -> asyncpg.Connection:
        connecting = asyncio.ensure_future(asyncpg.connect(
            driver_dsn(self.dsn), timeout=self.timeout, command_timeout=self.timeout,
            server_settings={"application_name": self.application_name}, **connect_kwargs(self.dsn),
        ))
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # Stopped mid-handshake: let the handshake end and close its
            # connection, rather than abandon a socket asyncpg complains about.
            with contextlib.suppress(Exception):
                (await asyncio.wait_for(connecting, min(self.timeout, 1.0))).terminate()
            raise

    async def _ping(self, conn: asyncpg.Connection) -> None:
        """A dead peer behind a silent network never closes the socket: ask."""
        await conn.execute("select 1", timeout=self.timeout)

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel in (JOBS_CHANNEL, EVENTS_CHANNEL):
                    await conn.add_listener(channel, self._deliver)
                self.connections += 1
                self._outage.ok()
                self._backoff.reset()
                self._up.set()
                for sub in tuple(self._subscribers):
                    if sub.on_connect is not None:
                        sub.on_connect()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self.ping_seconds)
                    if not lost.is_set():
                        await self._ping(conn)
                raise ConnectionError("the LISTEN connection was closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # InternalClientError ("cannot switch to state ...") included:
                # it is how asyncpg reports a query that raced a FATAL.
                self._outage.failed(exc, "listening")
            finally:
                self._up.clear()
                if conn is not None:
                    conn.terminate()
            await self._backoff.sleep()


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Notifier]] = (
    weakref.WeakKeyDictionary()
)


def shared(dsn: str, **options: Any) -> Notifier:
    """The notifier of this event loop for `dsn`, created on first use (with
    `options`); dropped again once its last user stops it."""
    key = driver_dsn(dsn)
    loop = asyncio.get_running_loop()
    notifiers = _shared.setdefault(loop, {})
    notifier = notifiers.get(key)
    if notifier is None:
        notifier = notifiers[key] = Notifier(dsn, **options)

        def forget(notifier: Notifier = notifier) -> None:
            if notifiers.get(key) is notifier:
                del notifiers[key]

        notifier._on_stopped = forget
    return notifier
