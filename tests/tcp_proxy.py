"""A TCP proxy between the engine and PostgreSQL that can fail the ways networks do.

- `freeze()`: every connection open now goes silent: bytes are swallowed in
  both directions, nothing is closed (a network cut, a failover without RST).
  Connections opened later work (the new primary answers), unless
  `blackhole=True`, in which case they go silent too.
- `cut()`: every connection is closed and new ones are refused until
  `restore()` (the database is gone, and says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class _Pipe:
    def __init__(self) -> None:
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []


class Proxy:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._dsn = parts
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self.mode = "open"  # open | blackhole | refuse
        self.port = 0
        self.connections = 0

    @property
    def dsn(self) -> str:
        netloc = self._dsn.netloc.rsplit("@", 1)
        user = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(self._dsn._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            self._close(pipe)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def freeze(self, *, blackhole: bool = False) -> None:
        for pipe in self._pipes:
            pipe.silent = True
        self.mode = "blackhole" if blackhole else "open"

    def cut(self) -> None:
        self.mode = "refuse"
        for pipe in list(self._pipes):
            self._close(pipe)

    def restore(self) -> None:
        self.mode = "open"

    def _close(self, pipe: _Pipe) -> None:
        for writer in pipe.writers:
            writer.close()
        for task in pipe.tasks:
            task.cancel()
        self._pipes.discard(pipe)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.close()
            return
        self.connections += 1
        pipe = _Pipe()
        pipe.silent = self.mode == "blackhole"
        pipe.writers.append(writer)
        self._pipes.add(pipe)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._close(pipe)
            return
        pipe.writers.append(up_writer)
        pipe.tasks = [
            asyncio.create_task(self._pump(pipe, reader, up_writer)),
            asyncio.create_task(self._pump(pipe, up_reader, writer)),
        ]

    async def _pump(self, pipe: _Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not pipe.silent:
                    writer.write(data)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not pipe.silent:  # a silent pipe never tells anyone it ended
                self._close(pipe)
