"""Slot accounting: which attempts this worker holds, and how much room is left.

Pure (no database, no tasks), so its rules are tested on their own.  An
attempt moves through two states and then is gone:

    start()          finish()              let_go()
  ─────────► running ────────► ending ───────────────► (gone)
             handler runs      outcome buffered or being written

A running attempt takes a slot (overall and of its kind); an ending one no
longer does, so the next claim need not wait for a write.  Both are *held*:
their leases are renewed until the outcome is written, so a slow write
never lets another worker take a finished job over.  Attempts are keyed by
(job, attempt): after a lost lease this worker may claim the same job again
while its stale attempt is still being stopped, and the two never mix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

Key = tuple[UUID, int]  # (job id, attempt)


@dataclass(slots=True)
class _Held:
    kind: str
    state: Literal["running", "ending"]


class Slots:
    def __init__(
        self, concurrency: int, kinds: Iterable[str], kind_limits: Mapping[str, int] | None = None
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.kinds = tuple(kinds)
        self.kind_limits = {k: min(concurrency, n) for k, n in (kind_limits or {}).items()}
        self._held: dict[Key, _Held] = {}
        self._running = 0
        self._running_by_kind: Counter[str] = Counter()

    @property
    def running(self) -> int:
        return self._running

    @property
    def free(self) -> int:
        return self.concurrency - self._running

    @property
    def idle(self) -> bool:
        """Nothing running and nothing left to write."""
        return not self._held

    def room(self) -> dict[str, int]:
        """Free slots per kind (kinds without room left out)."""
        # A kind without a limit of its own is limited by the free slots
        # alone.  (The old worker defaulted the limit to the free slots and
        # then subtracted the kind's running jobs again: with one kind and
        # r of 10 running it asked for 10 - 2r, never filling its slots.)
        free = self.free
        room = {
            kind: min(free, self.kind_limits.get(kind, self.concurrency) - self._running_by_kind[kind])
            for kind in self.kinds
        }
        return {k: n for k, n in room.items() if n > 0}

    def start(self, job_id: UUID, attempt: int, kind: str) -> None:
        key = (job_id, attempt)
        if key in self._held:
            raise ValueError(f"attempt {attempt} of job {job_id} is already held")
        self._held[key] = _Held(kind, "running")
        self._running += 1
        self._running_by_kind[kind] += 1

    def finish(self, job_id: UUID, attempt: int) -> None:
        """The handler is done: its slot is free, its outcome still to be written."""
        held = self._held[(job_id, attempt)]
        if held.state == "running":
            held.state = "ending"
            self._running -= 1
            self._running_by_kind[held.kind] -= 1

    def let_go(self, job_id: UUID, attempt: int) -> None:
        """The outcome is written (or there was none to write): stop renewing the lease."""
        held = self._held.get((job_id, attempt))
        if held is not None and held.state == "ending":
            del self._held[(job_id, attempt)]

    def held(self) -> dict[UUID, int]:
        """Job id -> attempt of every lease to renew (the latest attempt of a job)."""
        leases: dict[UUID, int] = {}
        for job_id, attempt in self._held:
            if attempt > leases.get(job_id, 0):
                leases[job_id] = attempt
        return leases

    def is_running(self, job_id: UUID, attempt: int) -> bool:
        held = self._held.get((job_id, attempt))
        return held is not None and held.state == "running"
