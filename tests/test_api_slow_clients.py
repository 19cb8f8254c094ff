"""Slow clients: five connections trickling headers are closed within the header timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from test_api_support import build, free_port, settings_for

from kyrie_engine.service import _uvicorn_server


@contextlib.asynccontextmanager
async def _serving(db_dsn: str, **settings: Any) -> AsyncIterator[int]:
    """The service's own uvicorn server on a free port, started and then stopped."""
    port = free_port()
    config = settings_for(db_dsn, port=port, host="127.0.0.1", **settings)
    server: Any = _uvicorn_server(build(db_dsn), config, lambda: None)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(600):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def _trickle(port: int, stop: asyncio.Event) -> float | None:
    """Send a request's headers one byte every 0.2 s; return when the server closed (None: never)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000
    try:
        for byte in head:
            if stop.is_set():
                return None
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
        return None
    except (ConnectionError, OSError):
        return time.monotonic() - started
    finally:
        writer.close()


async def test_five_trickling_connections_are_closed_within_the_header_timeout(db_dsn: str) -> None:
    stop = asyncio.Event()
    async with _serving(db_dsn, header_timeout_seconds=1.5) as port:
        try:
            closed = await asyncio.wait_for(
                asyncio.gather(*[_trickle(port, stop) for _ in range(5)]), timeout=30
            )
        finally:
            stop.set()
        assert all(c is not None and c < 1.5 + 1.0 for c in closed), closed
        # A client that sends its request at once is served as before, and kept alive.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(2):
                assert (await client.get("/healthz")).status_code == 200
            await asyncio.sleep(1.0)  # idle under the deadline: the next request is on time
            assert (await client.get("/healthz")).status_code == 200


async def test_headers_past_the_limit_are_refused_and_the_connection_closed(db_dsn: str) -> None:
    """llhttp keeps no limit on a head's size: the server's protocol counts what arrived."""
    async with _serving(db_dsn, max_header_bytes=1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Never complete (no blank line): only its size can end it.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2048)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=10)  # until the server closes
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        # Headers under the limit are served as before.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz", headers={"X-Small": "a" * 200})).status_code == 200
