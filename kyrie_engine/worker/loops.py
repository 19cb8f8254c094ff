"""A worker's side loops: named, started and stopped together, and watched.

A loop handles the database's comings and goings itself (see `outages`), so
one that ends by an exception is a bug: the worker must not go on claiming
jobs it can no longer finish, so `on_fatal` stops it (and `run()` raises).
So is one that returns, unless the worker is stopping (`is_stopping`): a
loop may then end on its own, as retention does when its stop event fires.
Adding a loop (retention, a scheduler) is one `add` call in `Worker._loops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("kyrie_engine.worker")


class Loops:
    def __init__(
        self, on_fatal: Callable[[str, BaseException], None], is_stopping: Callable[[], bool] = lambda: False
    ) -> None:
        self._on_fatal = on_fatal
        self._is_stopping = is_stopping
        self._factories: dict[str, Callable[[], Awaitable[None]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        if name in self._factories:
            raise ValueError(f"a loop named {name!r} exists already")
        self._factories[name] = loop
        if self._tasks:  # added while running: start it now
            self._start(name)

    @property
    def names(self) -> list[str]:
        return list(self._factories)

    def start(self) -> None:
        for name in self._factories:
            self._start(name)

    def _start(self, name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(self._factories[name]())  # type: ignore[arg-type]
        task.set_name(f"kyrie {name}")
        task.add_done_callback(functools.partial(self._done, name))
        self._tasks[name] = task

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if self._is_stopping():
                return
            exc = RuntimeError(f"the {name} loop returned")
        log.error("the %s loop died", name, exc_info=exc)
        self._on_fatal(name, exc)

    async def stop(self, within: float = 1.0) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), within)
