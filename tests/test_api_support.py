"""Helpers for the API tests (no tests here): the app with its lifespan, a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from kyrie_engine.api import build_app
from kyrie_engine.settings import Settings

SECRET = "test-internal-secret-" + "k" * 27  # 48 characters
MAX_BODY = 32 * 1024


def settings_for(dsn: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": dsn,
        "internal_secret": SECRET,
        "llm": "offline",
        "max_body_bytes": MAX_BODY,
        "db_timeout_seconds": 3,
        "sse_ping_seconds": 1,
        "shutdown_grace_seconds": 2,
        **changes,
    }
    return Settings(**values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def asgi_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, its lifespan run as a server would."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
            yield client


@asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a free loopback port, in this event loop; yields its URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(600):
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def build(dsn: str, **changes: Any) -> Starlette:
    return build_app(settings_for(dsn, **changes))


async def wait_ready(client: httpx.AsyncClient, within: float = 30) -> httpx.Response:
    """readyz, once it says ready (the listener connects in the background after start-up)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        response = await client.get("/readyz")
        if response.status_code == 200 or asyncio.get_running_loop().time() > deadline:
            return response
        await asyncio.sleep(0.05)
