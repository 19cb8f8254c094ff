"""A LISTEN connection that comes back by itself.

Notifications are only delivered to a session that is connected and has run
LISTEN, so the worker keeps one dedicated connection for them (never a pooled
one, and never through a transaction pooler).  When it drops (Postgres
restarted, `pg_terminate_backend`, a network cut the ping notices), this
reconnects with backoff, LISTENs again, and calls `on_connect`, because jobs
may have been enqueued while nobody was listening.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, Callable[[str], None]],
        *,
        on_connect: Callable[[], None] = lambda: None,
        application_name: str = "kyrie-listen",
        ping_seconds: float = 5.0,
        max_backoff_seconds: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self.channels = dict(channels)
        self.on_connect = on_connect
        self.application_name = application_name
        self.ping_seconds = ping_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.connected = asyncio.Event()
        self.connections = 0  # how many times it has (re)connected

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff = 0.05
        while True:
            try:
                await self._listen_once()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection lost or refused (%s); reconnecting", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_seconds)

    async def _listen_once(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.dsn,
            timeout=10,
            statement_cache_size=0,
            server_settings={"application_name": self.application_name},
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            for channel, callback in self.channels.items():
                await conn.add_listener(channel, _deliver(callback))
            self.connections += 1
            self.connected.set()
            self.on_connect()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), self.ping_seconds)
                except TimeoutError:
                    # Idle: make sure the server is still there (a dead peer
                    # behind a silent network does not close the socket).
                    await conn.fetchval("select 1", timeout=self.ping_seconds)
        finally:
            self.connected.clear()
            conn.terminate()


def _deliver(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notification(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notification
