"""The shared model budget's client side: Groq's rate-limit headers, and the SQL that paces every worker.

The budget itself is in Postgres (`kyrie.model_budgets`, see
20261201000601_model_budget.sql): one row per model, taken from by every
worker of every process before each request, so the fleet stays under the
organisation's limits together.  This module only reads Groq's headers and
calls the four functions that change a budget.

Groq's headers (https://console.groq.com/docs/rate-limits):
`x-ratelimit-limit-requests` is requests per DAY, `x-ratelimit-limit-tokens`
tokens per MINUTE, `x-ratelimit-remaining-*` what is left of them,
`x-ratelimit-reset-*` when they are full again, written like "7.66s",
"2m59.56s" or "1h2m3s", and `retry-after` (seconds) on a 429.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg
import httpx

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_RE = re.compile(rf"(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?")
_MS_RE = re.compile(r"(?P<ms>\d+(?:\.\d+)?)ms")


def parse_duration(text: str | None) -> float | None:
    """Groq's reset durations ("7.66s", "2m59.56s", "1h2m3s", "120ms") in seconds; None when unreadable."""
    if not text:
        return None
    value = text.strip()
    ms = _MS_RE.fullmatch(value)
    if ms:
        return float(ms["ms"]) / 1000
    match = _DURATION_RE.fullmatch(value)
    if not match or not any(match.groupdict().values()):
        return None
    return sum(float(match[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))


def _int(headers: httpx.Headers, name: str) -> int | None:
    try:
        value = int(float(headers[name]))
    except (KeyError, ValueError, OverflowError):
        return None
    return value if 0 <= value < 2**31 else None


@dataclass(frozen=True)
class RateHeaders:
    """What one response said about the organisation's limits (None: not sent or unreadable)."""

    limit_requests: int | None = None  # per day
    remaining_requests: int | None = None
    limit_tokens: int | None = None  # per minute
    remaining_tokens: int | None = None
    reset_requests: float | None = None  # seconds
    reset_tokens: float | None = None

    @classmethod
    def of(cls, headers: httpx.Headers | None) -> RateHeaders:
        if headers is None:
            return cls()
        h = headers
        return cls(
            limit_requests=_int(h, "x-ratelimit-limit-requests") or None,
            remaining_requests=_int(h, "x-ratelimit-remaining-requests"),
            limit_tokens=_int(h, "x-ratelimit-limit-tokens") or None,
            remaining_tokens=_int(h, "x-ratelimit-remaining-tokens"),
            reset_requests=parse_duration(h.get("x-ratelimit-reset-requests")),
            reset_tokens=parse_duration(h.get("x-ratelimit-reset-tokens")),
        )


@dataclass(frozen=True)
class Limits:
    """A model's limits as settings give them (None: unknown until the headers tell)."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    window_seconds: float = 60.0


async def seed(conn: asyncpg.Connection | asyncpg.Pool, model: str, limits: Limits) -> None:
    await conn.execute(
        "select kyrie.seed_model_budget($1, $2, $3, $4, $5, $6)",
        model, limits.rpm, limits.tpm, limits.rpd, limits.tpd, limits.window_seconds,
    )


async def take(conn: asyncpg.Connection | asyncpg.Pool, model: str, tokens: int) -> float:
    """Take one request and `tokens` from the budget: 0 when granted, else the seconds to wait."""
    return float(await conn.fetchval("select kyrie.take_model_budget($1, $2)", model, tokens))


async def settle(
    conn: asyncpg.Connection | asyncpg.Pool,
    model: str,
    estimated: int,
    used: int | None,
    headers: RateHeaders,
) -> None:
    """Correct the estimate with the real usage (None: no answer, give it all back); learn the headers."""
    await conn.execute(
        "select kyrie.settle_model_call($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        model, estimated, used or 0,
        headers.limit_requests, headers.remaining_requests,
        headers.limit_tokens, headers.remaining_tokens,
        headers.reset_requests, headers.reset_tokens,
    )


async def rate_limited(conn: asyncpg.Connection | asyncpg.Pool, model: str, retry_after: float) -> None:
    await conn.execute("select kyrie.model_rate_limited($1, $2)", model, retry_after)
