"""The figures of an analysis, read from the database as the requesting user.

Every read is its own read-only transaction inside `acting_as(conn,
user_id)`: role `authenticated` with the user's claims, exactly what
PostgREST does for the app.  So Row Level Security, not this module, decides
what an analysis can see: the worker's pool connects as the table owner, and
without `acting_as` it would see every tenant.  The workspace comes from the
job, never from the model; the functions called are SECURITY INVOKER
(kyrie_engine/sql/20261125000006_cfo_figures.sql), so they see what the user sees.

The per-contract figures, the currency totals and the anomalies come from
one call of `kyrie.cfo_figures` (one pass over the worklogs,
kyrie_engine/sql/20261201000401_cfo_one_pass.sql), made the first time a
tool asks for any of them and shared by the others: the scope is fixed for
the job, so the three answers are those of one snapshot.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ConfigDict, model_validator

from kyrie_engine.db import acting_as

# A quarter, both ends included, when the request names no period.
DEFAULT_PERIOD_DAYS = 90


class AnalysisRequest(BaseModel):
    """The payload of a `cfo.analyze` job (what `POST /ai/cfo/analyze` enqueues)."""

    model_config = ConfigDict(extra="ignore")

    contract_ids: list[UUID] | None = None
    period_start: dt.date | None = None
    period_end: dt.date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> AnalysisRequest:
        if self.period_start and self.period_end and self.period_start > self.period_end:
            raise ValueError("period_start is after period_end")
        return self


@dataclass(frozen=True)
class Scope:
    """Whose books, which contracts, which dates: fixed for the whole job."""

    workspace_id: UUID
    user_id: UUID
    period_start: dt.date
    period_end: dt.date
    contract_ids: tuple[UUID, ...] | None = None

    @classmethod
    def of(cls, workspace_id: UUID, user_id: UUID, request: AnalysisRequest, today: dt.date) -> Scope:
        """Resolve an open period to concrete dates, so the result says exactly what it covers."""
        end = request.period_end or (
            request.period_start + dt.timedelta(days=DEFAULT_PERIOD_DAYS - 1)
            if request.period_start
            else today
        )
        start = request.period_start or end - dt.timedelta(days=DEFAULT_PERIOD_DAYS - 1)
        ids = tuple(dict.fromkeys(request.contract_ids)) if request.contract_ids is not None else None
        return cls(workspace_id, user_id, start, end, ids)

    def args(self) -> tuple[Any, ...]:
        ids = list(self.contract_ids) if self.contract_ids is not None else None
        return (self.workspace_id, self.period_start, self.period_end, ids)


def plain(value: Any) -> Any:
    """A JSON-ready copy: numbers as JSON numbers, dates as ISO text, ids as text.

    Figures are numeric(…, 2) values well inside a double's 15 exact digits,
    so the float prints back as the same decimal (the report check compares
    as Decimal either way).
    """
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dt.date | UUID):
        return str(value)
    return value


class FigureReader:
    """The SQL an analysis runs, each call as the requesting user.

    `sql_seconds` is the wall time during which at least one of these reads
    was in flight (pool wait included): CrewAI runs a turn's tool calls in
    parallel, so a plain sum of their durations would count overlapping
    time twice and could exceed the analysis's own wall time.
    """

    def __init__(self, pool: asyncpg.Pool, scope: Scope, *, timeout: float = 60.0) -> None:
        self.pool = pool
        self.scope = scope
        self.timeout = timeout
        self._sql_done = 0.0
        self.queries = 0
        self._in_flight = 0
        self._busy_since = 0.0
        self._figures: asyncio.Future[dict[str, list[dict[str, Any]]]] | None = None

    @property
    def sql_seconds(self) -> float:
        """Including the read in flight so far: a difference of two readings is the SQL time
        between them, even when a read (the prefetch) started before the first."""
        busy = time.perf_counter() - self._busy_since if self._in_flight else 0.0
        return self._sql_done + busy

    def prefetch(self) -> None:
        """Start the one pass now: the agent's first turn asks for it, and the fetch
        runs on the event loop while CrewAI builds the crew in its thread."""
        if self._figures is None:
            self._figures = asyncio.ensure_future(self._fetch_figures())
            # A run that ends before any tool asks (a cancelled job) must not leave
            # an exception nobody retrieved; the tools that do ask see it themselves.
            self._figures.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        # All reads run on the event loop, so this bookkeeping needs no lock.
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            async with self.pool.acquire() as conn, acting_as(conn, self.scope.user_id, readonly=True):
                rows = await conn.fetch(query, *args, timeout=self.timeout)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._sql_done += time.perf_counter() - self._busy_since
            self.queries += 1
        return [dict(r) for r in rows]

    async def can_read_workspace(self) -> bool:
        """Still a member?  Membership may have ended between the request and the run."""
        rows = await self._fetch("select kyrie.is_workspace_member($1) as ok", self.scope.workspace_id)
        return bool(rows and rows[0]["ok"])

    async def _all_figures(self) -> dict[str, list[dict[str, Any]]]:
        """The one-pass result, fetched once; concurrent callers (CrewAI runs a turn's
        tools in parallel) wait for the same fetch.  A failed fetch is not kept."""
        self.prefetch()
        shared = self._figures
        assert shared is not None
        try:
            return await asyncio.shield(shared)
        except Exception:
            if self._figures is shared:
                self._figures = None
            raise

    async def _fetch_figures(self) -> dict[str, list[dict[str, Any]]]:
        rows = await self._fetch(
            "select contracts, totals, anomalies from kyrie.cfo_figures($1, $2, $3, $4)", *self.scope.args()
        )
        row = rows[0]
        return {key: [dict(r) for r in row[key]] for key in ("contracts", "totals", "anomalies")}

    async def contract_figures(self) -> list[dict[str, Any]]:
        return [dict(r) for r in (await self._all_figures())["contracts"]]

    async def currency_totals(self) -> list[dict[str, Any]]:
        return [dict(r) for r in (await self._all_figures())["totals"]]

    async def worklog_anomalies(self) -> list[dict[str, Any]]:
        return [dict(r) for r in (await self._all_figures())["anomalies"]]

    async def worklog_notes(self, contract_id: UUID, limit: int = 20) -> list[dict[str, Any]]:
        """Latest entries of one contract, if the user can see it and it is in scope (else none)."""
        if self.scope.contract_ids is not None and contract_id not in self.scope.contract_ids:
            return []
        s = self.scope
        return await self._fetch(
            "select * from kyrie.worklog_notes($1, $2, $3, $4, $5)",
            s.workspace_id,
            contract_id,
            s.period_start,
            s.period_end,
            limit,
        )
