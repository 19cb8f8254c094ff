"""What became of one attempt: a value the executor returns and the completer writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias
from uuid import UUID

from kyrie_engine.queue import JsonText


@dataclass(frozen=True, slots=True)
class Completed:
    result: JsonText | None  # encoded once, by the executor


@dataclass(frozen=True, slots=True)
class Failed:
    """`error` is the one line members read in `jobs.error`; `detail` (the
    traceback) goes to the operators' `kyrie.job_attempts` only."""

    error: str
    detail: str | None
    retry: bool


@dataclass(frozen=True, slots=True)
class Deferred:
    """RetryLater: back to pending after `delay` seconds, the attempt not counted."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Released:
    """Handed back by a stopping worker: pending now, the attempt not counted."""


@dataclass(frozen=True, slots=True)
class Forgotten:
    """Nothing to write: cancelled, taken over, or completed by its handler."""

    why: str


Outcome: TypeAlias = Completed | Failed | Deferred | Released | Forgotten


@dataclass(frozen=True, slots=True)
class Ended:
    """An outcome and the attempt it belongs to: what the completer buffers."""

    job_id: UUID
    attempt: int
    outcome: Outcome
