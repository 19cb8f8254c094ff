"""The queue's Python face: the one module that speaks queue SQL.

Every state transition is a function in `kyrie_engine/sql/20261125000004_jobs.sql`; this
module calls them and turns rows into Python values.  It works on any asyncpg
connection or pool, whether or not the caller registered a JSON codec: JSON
crosses the wire as text (`$n::text::jsonb` in, `::text` out), so the API's
pool, a handler's transaction and the worker's own pool all behave alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias
from uuid import UUID

import asyncpg
import pydantic_core
from asyncpg.pool import PoolConnectionProxy
from pydantic import BaseModel

from kyrie_engine.db import BoundedPool

# Anything that runs a statement: a connection (possibly inside the caller's
# transaction), a pool, or a connection acquired from a pool.
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy | BoundedPool
Status = Literal["pending", "running", "completed", "failed", "cancelled"]
log = logging.getLogger(__name__)
STATUSES: tuple[Status, ...] = ("pending", "running", "completed", "failed", "cancelled")


class JsonText(str):
    """JSON that is already encoded; `to_json` passes it through unchanged."""


def to_json(value: Any) -> str | None:
    """JSON text for a jsonb parameter; None stays SQL NULL.  pydantic's encoder
    takes what handlers return in practice (dates, Decimals, UUIDs, models)."""
    if value is None:
        return None
    if isinstance(value, JsonText):
        return value
    return pydantic_core.to_json(value).decode()


def _from_json(text: str | None) -> Any:
    """pydantic's parser: the same values as `json.loads` for any text jsonb
    can hold, at a tenth of its cost for a small payload (a claim parses one
    per job)."""
    return None if text is None else pydantic_core.from_json(text)


class Job(BaseModel):
    """A row of `public.jobs`, as the API and the CLI show it."""

    id: UUID
    workspace_id: UUID | None
    user_id: UUID | None
    kind: str
    payload: dict[str, Any]
    status: Status
    result: Any
    error: str | None
    priority: int
    run_at: dt.datetime
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    idempotency_key: str | None
    progress: dict[str, Any] | None
    usage: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Job:
        data = dict(row)
        for key in ("payload", "result", "progress", "usage"):
            data[key] = _from_json(data[key])
        return cls.model_validate(data)


# The columns of a job with its JSON as text; `{src}` is a set-returning call.
_JOB_SELECT = """
select id, workspace_id, user_id, kind, payload::text as payload, status, result::text as result,
       error, priority, run_at, attempts, max_attempts, lease_owner, lease_expires_at,
       idempotency_key, progress::text as progress, usage::text as usage,
       created_at, updated_at, started_at, finished_at
from {src}
"""


def _select(src: str) -> str:
    return _JOB_SELECT.format(src=src)


class Enqueued(NamedTuple):
    id: UUID
    created: bool  # False: the idempotency key matched an existing job, whose id this is


# ---------------------------------------------------------------------------
# enqueue and look up (the API, embedding programs)


def _autocommit(executor: Executor) -> bool:
    """True when each statement on `executor` commits on its own."""
    return isinstance(executor, asyncpg.Pool | BoundedPool) or not executor.is_in_transaction()


class _WakeUps:
    """One `kyrie.wake_workers()` for many concurrent enqueues of a process.

    A notification wakes workers for every job committed before it was sent.
    So a caller whose insert has committed need not send its own if a send
    *started* after its commit; it waits for the send in flight (which may
    have started earlier), then sends unless a later one already covered it.
    Fifty concurrent callers make two or three calls instead of fifty.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._committed = 0  # commits counted so far
        self._covered = 0  # commits a started notification covers

    async def after_commit(self, executor: Executor) -> None:
        self._committed += 1
        mine = self._committed
        async with self._lock:
            if self._covered >= mine:
                return
            upto = self._committed
            await executor.execute("select kyrie.wake_workers()")
            self._covered = max(self._covered, upto)


_wake_ups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WakeUps] = weakref.WeakKeyDictionary()


async def wake_workers(executor: Executor) -> None:
    """Best effort: the job is committed, and a worker's poll finds it anyway,
    so a failure here must not make the caller think the enqueue failed."""
    loop = asyncio.get_running_loop()
    wake = _wake_ups.get(loop)
    if wake is None:
        wake = _wake_ups[loop] = _WakeUps()
    try:
        await wake.after_commit(executor)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("jobs committed but the wake-up notification failed (%s); workers will poll", exc)


# The CHECK on public.jobs.kind (20261125000004_jobs.sql), as Python sees it;
# tests/test_enqueue_api.py ties the two together.
KIND_PATTERN = r"[a-z][a-z0-9_.:-]{0,99}"
_KIND_RE = re.compile(KIND_PATTERN)
KIND_RULE = (
    "1 to 100 characters: a lowercase letter, then lowercase letters, digits, '_', '.', ':' or '-' "
    "(e.g. 'emails.send')"
)


def check_kind(kind: str) -> str:
    """`kind`, or ValueError naming the rule a kind must follow.

    The database refuses any other kind (with a bare CheckViolationError), so a
    job of it can never be enqueued: a Worker given a handler for it should
    refuse it at registration, as enqueue refuses it here.
    """
    if not isinstance(kind, str):
        raise TypeError(f"a job kind is a str, not {type(kind).__name__}")
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid job kind {kind!r}: a kind is {KIND_RULE}")
    return kind


def _payload_json(payload: Any) -> str:
    """A payload's JSON text, or TypeError: a payload is a JSON object, and a
    handler gets it back as a dict.  (bytes or a str would be stored as a JSON
    string, a list as an array, and the handler would get those instead.)"""
    if not isinstance(payload, Mapping):
        encoded = isinstance(payload, (bytes, bytearray, str))
        hint = " (decode it first: json.loads(payload))" if encoded else ""
        raise TypeError(
            f"a job payload is a dict (a JSON object), not {type(payload).__name__}{hint}; use {{}} for none"
        )
    text = to_json(dict(payload))
    assert text is not None
    return text


def _per_job(name: str, value: Any, n: int, scalar: tuple[type, ...]) -> list[Any]:
    """One value per job: a scalar (or None) is the same for all, a sequence must have n items."""
    if value is None or isinstance(value, scalar):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} items for {n} payloads")
    return values


async def enqueue(
    executor: Executor,
    kind: str,
    payload: Mapping[str, Any],
    *,
    workspace_id: UUID | None = None,
    user_id: UUID | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    run_at: dt.datetime | None = None,
    max_attempts: int | None = None,
) -> Enqueued:
    """Add one job.  On a connection inside a transaction, the job exists (and
    the workers are woken) only if that transaction commits.  ValueError for a
    kind the table refuses, TypeError for a payload that is not a dict."""
    check_kind(kind)
    payload_json = _payload_json(payload)
    own_commit = _autocommit(executor)
    row = await executor.fetchrow(
        "select id, created from kyrie.enqueue_job($1, $2::text::jsonb, $3, $4, $5, $6, $7, $8, $9)",
        kind, payload_json, workspace_id, user_id, idempotency_key, priority, run_at, max_attempts,
        not own_commit,
    )
    assert row is not None
    if own_commit and row["created"]:
        await wake_workers(executor)
    return Enqueued(row["id"], row["created"])


async def enqueue_many(
    executor: Executor,
    kind: str,
    payloads: Sequence[Mapping[str, Any]],
    *,
    workspace_id: UUID | None = None,
    user_id: UUID | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    priority: int | Sequence[int] = 0,
    run_at: dt.datetime | Sequence[dt.datetime | None] | None = None,
    max_attempts: int | None = None,
) -> list[UUID]:
    """Add many jobs of one kind in one statement: one commit, one wake-up.

    `idempotency_keys` (one per payload, None for none), `priority` and
    `run_at` (one for all, or one per payload) are per job.  The ids come back
    in payload order; a key that matches an existing job (of an earlier call,
    or earlier in this batch) gives that job's id and enqueues nothing, so a
    caller whose commit answer was lost sends the same batch again and gets the
    same ids.
    """
    check_kind(kind)
    n = len(payloads)
    texts = [_payload_json(p) for p in payloads]
    keys = _per_job("idempotency_keys", idempotency_keys, n, ())
    priorities = _per_job("priority", priority, n, (int,))
    run_ats = _per_job("run_at", run_at, n, (dt.datetime,))
    if not n:
        return []
    own_commit = _autocommit(executor)
    rows = await executor.fetch(
        "select id, created from kyrie.enqueue_jobs($1, $2::text[]::jsonb[], $3, $4, $5::text[], $6::int[],"
        " $7::timestamptz[], $8, $9)",
        kind, texts, workspace_id, user_id, keys, priorities, run_ats, max_attempts, not own_commit,
    )
    if own_commit and any(r["created"] for r in rows):
        await wake_workers(executor)
    return [r["id"] for r in rows]


async def get_job(executor: Executor, id: UUID) -> Job | None:
    row = await executor.fetchrow(_select("public.jobs") + " where id = $1", id)
    return None if row is None else Job.from_record(row)


async def cancel_job(executor: Executor, id: UUID, reason: str | None = None) -> Job | None:
    """Cancel a pending or running job; a running handler is stopped within a
    second.  Returns the job as it now is (status tells whether it was still
    cancellable), None when there is no such job."""
    row = await executor.fetchrow(_select("kyrie.cancel_job($1, $2)"), id, reason)
    return None if row is None else Job.from_record(row)


async def retry_job(executor: Executor, id: UUID) -> Job | None:
    """Run a failed or cancelled job again with fresh attempts (or a scheduled one now)."""
    row = await executor.fetchrow(_select("kyrie.retry_job($1)"), id)
    return None if row is None else Job.from_record(row)


async def list_jobs(
    executor: Executor,
    *,
    status: Status | None = None,
    kind: str | None = None,
    workspace_id: UUID | None = None,
    limit: int = 50,
) -> list[Job]:
    """Latest first, optionally filtered."""
    rows = await executor.fetch(
        _select("public.jobs")
        + " where ($1::text is null or status = $1) and ($2::text is null or kind = $2)"
        " and ($3::uuid is null or workspace_id = $3) order by created_at desc limit $4",
        status, kind, workspace_id, limit,
    )
    return [Job.from_record(r) for r in rows]


async def queue_stats(executor: Executor) -> list[dict[str, Any]]:
    return [dict(r) for r in await executor.fetch("select * from kyrie.queue_stats")]


async def running_jobs(executor: Executor) -> list[dict[str, Any]]:
    rows = await executor.fetch(
        "select id, kind, workspace_id, attempt, max_attempts, lease_owner, started_at, running_for,"
        " lease_left, progress::text as progress from kyrie.running_jobs"
    )
    return [{**dict(r), "progress": _from_json(r["progress"])} for r in rows]


async def recent_failures(executor: Executor, limit: int = 20) -> list[dict[str, Any]]:
    return [dict(r) for r in await executor.fetch("select * from kyrie.recent_failures limit $1", limit)]


async def purge_jobs(executor: Executor, older_than: dt.timedelta) -> int:
    return int(await executor.fetchval("select kyrie.purge_jobs($1)", older_than))


async def set_kind_limit(executor: Executor, kind: str, max_running: int | None) -> None:
    """Cap running jobs of a kind across all workers (None removes the cap)."""
    if max_running is None:
        await executor.execute("delete from kyrie.job_kind_limits where kind = $1", kind)
    else:
        await executor.execute(
            "insert into kyrie.job_kind_limits (kind, max_running) values ($1, $2)"
            " on conflict (kind) do update set max_running = excluded.max_running",
            kind, max_running,
        )


# ---------------------------------------------------------------------------
# the worker's side


@dataclass(slots=True)
class ClaimedJob:
    """What a worker needs to run one attempt; lighter than `Job` on the hot path."""

    id: UUID
    kind: str
    payload: dict[str, Any]
    workspace_id: UUID | None
    user_id: UUID | None
    attempt: int
    max_attempts: int


async def claim_jobs(
    executor: Executor, owner: str, room: Mapping[str, int], limit: int, lease_seconds: float
) -> list[ClaimedJob]:
    """Up to `limit` due jobs, at most `room[kind]` of each kind, leased to `owner`."""
    kinds = [k for k, n in room.items() if n > 0]
    if not kinds or limit <= 0:
        return []
    rows = await executor.fetch(
        "select id, kind, payload::text as payload, workspace_id, user_id, attempt, max_attempts"
        " from kyrie.claim_jobs($1, $2, $3, $4, $5)",
        owner, kinds, [room[k] for k in kinds], limit, lease_seconds,
    )
    return [
        ClaimedJob(r["id"], r["kind"], _from_json(r["payload"]), r["workspace_id"], r["user_id"],
                   r["attempt"], r["max_attempts"])
        for r in rows
    ]


def _in_id_order(held: Iterable[tuple[UUID, int]]) -> tuple[list[UUID], list[int]]:
    """Batch statements lock their rows in array order; one order for all of
    them (the heartbeat and a flush run at once) means they cannot deadlock."""
    pairs = sorted(held)
    return [id for id, _ in pairs], [attempt for _, attempt in pairs]


async def heartbeat_jobs(
    executor: Executor, owner: str, held: Mapping[UUID, int], lease_seconds: float
) -> set[UUID]:
    """Extend the leases of `held` (id -> attempt) and mark `owner` alive in
    kyrie.workers (also when it holds nothing); returns the ids still held."""
    ids, attempts = _in_id_order(held.items())
    rows = await executor.fetch(
        "select id from kyrie.heartbeat_jobs($1, $2, $3, $4) as id", owner, ids, attempts, lease_seconds
    )
    return {r["id"] for r in rows}


async def set_progress(
    executor: Executor, id: UUID, owner: str, attempt: int, progress: dict[str, Any]
) -> bool:
    return bool(await executor.fetchval(
        "select kyrie.set_job_progress($1, $2, $3, $4::text::jsonb)", id, owner, attempt, to_json(progress)
    ))


async def complete_job(
    executor: Executor, id: UUID, owner: str, attempt: int, result: Any, usage: dict[str, Any] | None = None
) -> bool:
    return bool(await executor.fetchval(
        "select kyrie.complete_job($1, $2, $3, $4::text::jsonb, $5::text::jsonb)",
        id, owner, attempt, to_json(result), to_json(usage),
    ))


async def complete_jobs(executor: Executor, owner: str, done: Iterable[tuple[UUID, int, Any]]) -> set[UUID]:
    """Complete many attempts (id, attempt, result) in one statement; returns those completed."""
    ids, attempts, results = [], [], []
    for id, attempt, result in sorted(done, key=lambda d: d[0]):
        ids.append(id)
        attempts.append(attempt)
        results.append(to_json(result))
    if not ids:
        return set()
    rows = await executor.fetch(
        "select id from kyrie.complete_jobs($1, $2, $3, $4::text[]::jsonb[]) as id",
        owner, ids, attempts, results,
    )
    return {r["id"] for r in rows}


async def fail_job(
    executor: Executor,
    id: UUID,
    owner: str,
    attempt: int,
    error: str,
    *,
    retry: bool = True,
    base_seconds: float = 2.0,
    cap_seconds: float = 3600.0,
) -> Status | None:
    """Record a failed attempt; returns the new status ('pending' = will retry),
    None when the attempt was no longer held."""
    row = await executor.fetchrow(
        "select status from kyrie.fail_job($1, $2, $3, $4, $5, $6, $7)",
        id, owner, attempt, error, retry, base_seconds, cap_seconds,
    )
    return None if row is None else row["status"]


async def retry_later(
    executor: Executor,
    id: UUID,
    owner: str,
    attempt: int,
    delay_seconds: float,
    reason: str | None = None,
    max_deferrals: int = 100,
) -> Status | None:
    """Back to pending after `delay_seconds`, the attempt given back; 'failed' once the job
    has been deferred `max_deferrals` times; None when the attempt no longer holds the job."""
    status: Status | None = await executor.fetchval(
        "select kyrie.retry_later($1, $2, $3, $4, $5, $6)",
        id, owner, attempt, delay_seconds, reason, max_deferrals,
    )
    return status


async def release_jobs(executor: Executor, owner: str, held: Mapping[UUID, int]) -> set[UUID]:
    """Hand attempts back (pending, due now, attempt not counted); returns those released."""
    if not held:
        return set()
    ids, attempts = _in_id_order(held.items())
    rows = await executor.fetch("select id from kyrie.release_jobs($1, $2, $3) as id", owner, ids, attempts)
    return {r["id"] for r in rows}


async def reclaim_expired_leases(executor: Executor) -> list[tuple[UUID, Status]]:
    """Put jobs whose worker vanished back in the queue; returns (id, new status)."""
    rows = await executor.fetch("select id, status from kyrie.reclaim_expired_leases()")
    return [(r["id"], r["status"]) for r in rows]


class FailedAttempt(NamedTuple):
    id: UUID
    attempt: int
    error: str  # one line, what members read in jobs.error
    detail: str | None  # operators only (kyrie.job_attempts)
    retry: bool


async def fail_jobs(
    executor: Executor,
    owner: str,
    failed: Iterable[FailedAttempt],
    *,
    base_seconds: float = 2.0,
    cap_seconds: float = 3600.0,
) -> dict[UUID, Status]:
    """Record failed attempts in one statement; returns id -> new status
    ('pending' = will retry) for those still held."""
    rows = sorted(failed)
    if not rows:
        return {}
    result = await executor.fetch(
        "select id, status from kyrie.fail_jobs($1, $2, $3, $4, $5, $6, $7, $8)",
        owner, [r.id for r in rows], [r.attempt for r in rows], [r.error for r in rows],
        [r.detail for r in rows], [r.retry for r in rows], base_seconds, cap_seconds,
    )
    return {r["id"]: r["status"] for r in result}


class DeferredAttempt(NamedTuple):
    id: UUID
    attempt: int
    delay_seconds: float
    reason: str | None


async def retry_later_jobs(
    executor: Executor, owner: str, deferred: Iterable[DeferredAttempt], max_deferrals: int = 100
) -> dict[UUID, Status]:
    """`retry_later` for many attempts in one statement; returns id -> new status."""
    rows = sorted(deferred)
    if not rows:
        return {}
    result = await executor.fetch(
        "select id, status from kyrie.retry_later_jobs($1, $2, $3, $4, $5, $6)",
        owner, [r.id for r in rows], [r.attempt for r in rows], [r.delay_seconds for r in rows],
        [r.reason for r in rows], max_deferrals,
    )
    return {r["id"]: r["status"] for r in result}


async def register_worker(executor: Executor, id: str, hostname: str, pid: int, kinds: Sequence[str]) -> None:
    """Say who `id` (the opaque lease owner) is, for operators (kyrie.workers)."""
    await executor.execute("select kyrie.register_worker($1, $2, $3, $4)", id, hostname, pid, list(kinds))


async def job_attempts(executor: Executor, id: UUID) -> list[dict[str, Any]]:
    """A job's attempts that did not complete, oldest first, with their detail (operators)."""
    rows = await executor.fetch(
        "select attempt, worker, started_at, finished_at, outcome, error, detail"
        " from kyrie.job_attempts where job_id = $1 order by finished_at, id", id,
    )
    return [dict(r) for r in rows]
