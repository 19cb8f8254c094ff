"""Durable model calls: one job's conversation with the model, stored as it goes, replayed after a crash.

Each request of an attempt has a place (`seq`: 0, 1, 2, ... in the order the
agent asks) and a hash (SHA-256 of the request's canonical JSON).  Before a
request goes out, the store is asked for a response at that place with that
hash: after a SIGKILL or a lease expiry, the next attempt's agent asks the
same questions in the same order (the tools read the same figures, the
replayed answers carry the same tool-call ids), so every call already
answered is replayed and costs nothing; the first changed request, and
everything after it, goes to the provider.

`JobModelCalls` is what the model (synchronous, in the agent's worker thread)
holds: it runs the store's and the budget's SQL on the worker's event loop,
as the agent's tools do, and waits for the answer.  It also paces requests
by the shared budget: a short wait is slept in the call, a long one becomes
`ModelRateLimited` (the handler turns it into RetryLater: no attempt used).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from kyrie_engine.agents import budget
from kyrie_engine.agents.errors import AnalysisStopped, ModelRateLimited

T = TypeVar("T")


def request_hash(params: dict[str, Any]) -> bytes:
    """SHA-256 of the request as sent (keys sorted, so dict order never changes it)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).digest()


def estimate_tokens(params: dict[str, Any], completion_share: int) -> int:
    """Tokens a request will cost before it is sent: its JSON at ~4 characters a token,
    plus a share of the output (corrected with the real usage afterwards)."""
    text = len(json.dumps(params.get("messages") or [])) + len(json.dumps(params.get("tools") or []))
    most = int(params.get("max_completion_tokens") or completion_share)
    return (text + 3) // 4 + min(completion_share, most)


async def replay(conn: asyncpg.Connection | asyncpg.Pool, job_id: UUID, seq: int, digest: bytes) -> Any:
    raw = await conn.fetchval("select kyrie.replay_model_call($1, $2, $3)::text", job_id, seq, digest)
    return None if raw is None else json.loads(raw)


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    job_id: UUID,
    attempt: int,
    seq: int,
    digest: bytes,
    model: str,
    response: dict[str, Any],
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    await conn.execute(
        "select kyrie.record_model_call($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)",
        job_id, attempt, seq, digest, model, json.dumps(response), prompt_tokens, completion_tokens,
    )


class JobModelCalls:
    """One attempt's store and budget, as the model's thread sees them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        loop: asyncio.AbstractEventLoop,
        job_id: UUID,
        attempt: int,
        model: str,
        stop: threading.Event,
        *,
        max_wait_seconds: float = 3.0,
        timeout: float = 60.0,
    ) -> None:
        self.pool = pool
        self.loop = loop
        self.job_id = job_id
        self.attempt = attempt
        self.model = model
        self.stop = stop
        self.max_wait_seconds = max_wait_seconds
        self.timeout = timeout
        self.replayed = 0  # responses served from the store in this attempt
        self.waited_seconds = 0.0  # slept for the budget inside this attempt

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.stop.is_set():
            coro.close()
            raise AnalysisStopped("the job was cancelled or lost")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def replay(self, seq: int, digest: bytes) -> dict[str, Any] | None:
        found = self._run(replay(self.pool, self.job_id, seq, digest))
        if found is not None:
            self.replayed += 1
        return found

    def record(self, seq: int, digest: bytes, response: dict[str, Any], prompt: int, completion: int) -> None:
        job, attempt, model = self.job_id, self.attempt, self.model
        self._run(record(self.pool, job, attempt, seq, digest, model, response, prompt, completion))

    def take(self, tokens: int) -> None:
        """Return once the budget granted the request; a wait past `max_wait_seconds` defers the job."""
        while True:
            wait = self._run(budget.take(self.pool, self.model, tokens))
            if wait <= 0:
                return
            if wait > self.max_wait_seconds:
                raise ModelRateLimited(wait)
            if self.stop.wait(wait):
                raise AnalysisStopped("the job was cancelled or lost")
            self.waited_seconds += wait

    def settle(self, estimated: int, used: int | None, headers: budget.RateHeaders) -> None:
        self._run(budget.settle(self.pool, self.model, estimated, used, headers))

    def rate_limited(self, retry_after: float) -> None:
        self._run(budget.rate_limited(self.pool, self.model, retry_after))
