"""Runs one attempt of one job and turns whatever happened into an `Outcome`.

Nothing here writes to the database: the completer does, in batches.  What
members may read (`jobs.error`) is one line a person can act on; the
traceback is the operators' (`Failed.detail`, kept in `kyrie.job_attempts`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from kyrie_engine import queue
from kyrie_engine.context import JobContext, LeaseLost, PermanentFailure, RetryLater
from kyrie_engine.worker.outcomes import Completed, Deferred, Failed, Forgotten, Outcome, Released

Handler: TypeAlias = Callable[[JobContext], Awaitable[Any] | Any]
StopReason: TypeAlias = Literal["cancelled", "lost", "shutdown", "timeout"]

SUMMARY_CHARS = 300
DETAIL_CHARS = 20_000
# Absolute file paths (a traceback's, or an OSError's): where the code and
# its data live is nobody's business but the operators'.
_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


@dataclass(eq=False)
class Attempt:
    """One running attempt: its context, its task, and why it was stopped (if it was)."""

    ctx: JobContext
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = field(default=None)
    deadline: float | None = None  # time.monotonic() after which it is stopped

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None and self.task is not None and not self.task.done():
            self.stop_reason = reason
            self.task.cancel()


def summary(exc: BaseException) -> str:
    """`Type: first line of the message`, paths removed, bounded: what a member reads."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return one_line(text)


def one_line(text: str) -> str:
    text = _PATH.sub("…", " ".join(text.split()))
    if len(text) > SUMMARY_CHARS:
        text = text[: SUMMARY_CHARS - 1] + "…"
    return text.replace("\x00", "\\0")  # NUL: the one character a text column refuses


def detail(exc: BaseException) -> str:
    """The whole story, for operators (`kyrie-engine jobs show`, psql)."""
    return "".join(traceback.format_exception(exc))[-DETAIL_CHARS:].replace("\x00", "\\0")


def _failed(exc: BaseException, retry: bool) -> Failed:
    return Failed(summary(exc), detail(exc), retry)


def is_async(handler: Handler) -> bool:
    """Whether `handler` runs on the event loop (else in a thread); asked once, at registration."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )


async def execute(
    handler: Handler, attempt: Attempt, limit: float | None, retry_cap: float, *, on_loop: bool = True
) -> Outcome:
    """Run the handler of `attempt` for at most `limit` seconds; never raises, except
    CancelledError when the event loop itself is going away.

    The limit is enforced by the worker's "timeouts" loop, which stops the
    attempt (reason "timeout") once `attempt.deadline` has passed: measured,
    an `asyncio.timeout` block (or a timer) per attempt was a tenth of a
    no-op job's cost in the worker."""
    ctx = attempt.ctx
    if limit is not None:
        attempt.deadline = time.monotonic() + limit
    try:
        if on_loop:
            result = await handler(ctx)  # type: ignore[misc]
        else:
            # A plain function: off the event loop, so it cannot stall the others.
            result = await asyncio.to_thread(handler, ctx)
            if inspect.isawaitable(result):
                result = await result
        if ctx.completed:
            return Forgotten("completed by its handler")
        # Encoded once, here: an unencodable result fails its attempt, not a batch.
        encoded = queue.to_json(result)
        return Completed(None if encoded is None else queue.JsonText(encoded))
    except RetryLater as exc:
        # Bounded like a backoff: run_at must stay a timestamp Postgres can hold.
        delay = exc.delay_seconds if math.isfinite(exc.delay_seconds) else retry_cap
        return Deferred(min(max(delay, 0.0), retry_cap), one_line(str(exc)))
    except PermanentFailure as exc:
        return _failed(exc, retry=False)
    except LeaseLost:
        return Forgotten("lease lost")
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if attempt.stop_reason is None:
            if task is not None and task.cancelling():
                raise  # not ours: the loop itself is going away
            # The handler raised CancelledError without being cancelled (a
            # library's inner future): an ordinary failure, or the job would
            # stay running, its lease renewed, until the process ends.
            return _failed(exc, retry=True)
        if task is not None:
            task.uncancel()
        if attempt.stop_reason == "timeout":
            return Failed(f"TimeoutError: handler for {ctx.kind} ran past its {limit}s timeout",
                          detail(exc), retry=True)
        if attempt.stop_reason == "shutdown":
            return Released()
        return Forgotten(attempt.stop_reason)
    except Exception as exc:
        if ctx.completed:  # it raised after completing its own job: the completion stands
            return Forgotten("completed by its handler")
        return _failed(exc, retry=True)
