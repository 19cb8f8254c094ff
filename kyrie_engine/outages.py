"""What "the database went away" looks like, and how every loop rides it out.

One list of transient errors, one backoff, one outage log, used by the
worker's units and the notifier alike.  Before there were five lists and six
hand-written loops, and an 8 s outage wrote ~170 warnings (one per failed
batch) with none saying the database was back.  Now a process says once that
the database is unreachable and once that it is back, with how long it was
gone; the failures in between are counted, logged at debug.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import asyncpg

# What a lost connection, a restarting server, a silent network (our
# command_timeout) or a lock conflict looks like: wait a little and try
# again.  Anything else is a bug and is raised.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # "cannot switch to state ..." / "protocol is in the failed state": a
    # query raced the server's FATAL on a dying connection.  The pool drops
    # that connection on release; the LISTEN loop reconnects.
    asyncpg.exceptions.InternalClientError,
)

# Every pool and connection of ours gets this (seconds) unless told
# otherwise: without it a query on a connection that went silent (a network
# cut or a failover without RST) waits forever.  Generous for the engine's
# statements, which take milliseconds; handlers' own long queries pass their
# own `timeout=`.
COMMAND_TIMEOUT = 10.0


def describe(exc: BaseException) -> str:
    """`Type: message`, or the type alone: `TimeoutError()` has no message, and
    "connection lost ()" told nobody anything."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class Backoff:
    """Exponential delays with full jitter, from `first` up to `cap` seconds.

    Jittered so that the workers of a fleet, all cut by the same outage, do
    not reconnect in lockstep."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay / 2 + random.random() * delay / 2  # noqa: S311 - jitter, not a secret

    def reset(self) -> None:
        self._next = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


class Outage:
    """One warning when the database goes away, one when it is back.

    Shared by all the loops of a unit (a worker, the notifier): whichever
    fails first says so, whichever succeeds first after that says it is back.
    """

    def __init__(
        self,
        log: logging.Logger,
        who: str,
        on_down: Callable[[], None] | None = None,
        on_back: Callable[[], None] | None = None,
    ) -> None:
        self.log = log
        self.who = who
        # E.g. replace a pool's idle connections: when one went silent, its
        # siblings opened at the same time likely did too.
        self.on_down = on_down
        self.on_back = on_back
        self.down_since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException, doing: str) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.log.warning("%s: database unreachable while %s (%s); retrying quietly",
                             self.who, doing, describe(exc))
            if self.on_down is not None:
                self.on_down()
        else:
            self.log.debug("%s: still unreachable while %s (%s)", self.who, doing, describe(exc))

    def ok(self) -> None:
        if self.down_since is None:
            return
        gone = time.monotonic() - self.down_since
        self.log.warning("%s: database back after %.1fs (%d failed call(s) meanwhile)",
                         self.who, gone, self.failures)
        self.down_since = None
        self.failures = 0
        if self.on_back is not None:
            self.on_back()
