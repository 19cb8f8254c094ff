"""Prometheus metrics: requests counted in process, jobs read from the database at scrape time.

The jobs table is the truth about jobs, and several processes (API replicas,
workers) share it, so job figures are read from it when Prometheus scrapes
rather than counted by whichever process happened to see a job: every replica
then reports the same numbers and none double-counts.  Job durations are the
quantiles over jobs finished in the last 15 minutes (a gauge, not a cumulative
histogram: a cumulative one would have to scan every job ever finished at each
scrape).

Each app has a registry of its own (tests build many apps in one process).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kyrie_engine.logs import describe_exception

log = logging.getLogger("kyrie_engine.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_WINDOW = "15 minutes"
QUANTILES = (0.5, 0.9, 0.99)

# One read-only statement, one round trip.  Counts come from the queue's own
# view (kyrie.queue_stats: one home for what "pending" and "due" mean); the
# duration quantiles cover the recent window only.
JOB_STATS_SQL = """
select
  (select coalesce(jsonb_agg(jsonb_build_object(
            'kind', s.kind,
            'pending', s.pending + s.scheduled, 'running', s.running, 'completed', s.completed,
            'failed', s.failed, 'cancelled', s.cancelled,
            'due', s.pending,
            'oldest_wait_s', coalesce(extract(epoch from s.oldest_pending_age), 0))), '[]')
   from kyrie.queue_stats s) as kinds,
  (select coalesce(jsonb_agg(jsonb_build_array(d.kind, d.n, d.quantiles)), '[]')
   from (
     select j.kind,
            count(*) as n,
            percentile_cont($1::float8[]) within group (
              order by extract(epoch from j.finished_at - j.started_at)::float8
            ) as quantiles
     from public.jobs j
     where j.finished_at >= now() - $2::text::interval
       and j.started_at is not null
       and j.status in ('completed', 'failed')
     group by j.kind
   ) d) as durations
"""

STATUSES = ("pending", "running", "completed", "failed", "cancelled")


class JobStats(Collector):
    """The last snapshot read from the database, rendered as gauges."""

    def __init__(self) -> None:
        self.database_up = 0
        self.kinds: list[dict[str, Any]] = []
        self.durations: list[tuple[str, int, list[float]]] = []

    async def refresh(self, pool: asyncpg.Pool, within: float) -> None:
        try:
            row = await asyncio.wait_for(_read(pool), within)
        except Exception as exc:
            # A scrape must still answer (with database_up 0) when the database is away.
            log.warning("metrics: cannot read the jobs table", extra=describe_exception(exc))
            self.database_up, self.kinds, self.durations = 0, [], []
            return
        self.database_up = 1
        self.kinds = json.loads(row["kinds"])
        durations = json.loads(row["durations"])
        self.durations = [(k, int(n), [float(q) for q in qs]) for k, n, qs in durations]

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kyrie_database_up", "1 if the last scrape could read the jobs table")
        up.add_metric([], self.database_up)
        yield up
        jobs = GaugeMetricFamily(
            "kyrie_jobs", "Jobs in the table, by kind and status", labels=["kind", "status"]
        )
        depth = GaugeMetricFamily(
            "kyrie_queue_depth", "Pending jobs that are due to run (not scheduled later)", labels=["kind"]
        )
        wait = GaugeMetricFamily(
            "kyrie_queue_oldest_wait_seconds", "How long the oldest due pending job has waited",
            labels=["kind"],
        )
        for row in self.kinds:
            for status in STATUSES:
                jobs.add_metric([row["kind"], status], row[status])
            depth.add_metric([row["kind"]], row["due"])
            wait.add_metric([row["kind"]], float(row["oldest_wait_s"]))
        yield jobs
        yield depth
        yield wait
        durations = GaugeMetricFamily(
            "kyrie_job_duration_seconds",
            f"Run time (started to finished) of jobs finished in the last {DURATION_WINDOW}, by quantile",
            labels=["kind", "quantile"],
        )
        finished = GaugeMetricFamily(
            "kyrie_job_duration_window_jobs", f"Jobs finished in the last {DURATION_WINDOW}", labels=["kind"]
        )
        for kind, n, quantiles in self.durations:
            finished.add_metric([kind], n)
            for q, value in zip(QUANTILES, quantiles, strict=True):
                durations.add_metric([kind, str(q)], value)
        yield durations
        yield finished


async def _read(pool: asyncpg.Pool) -> Any:
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        return await conn.fetchrow(JOB_STATS_SQL, list(QUANTILES), DURATION_WINDOW)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kyrie_http_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "kyrie_http_request_duration_seconds", "Time to answer (to the first byte of a stream)",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = JobStats()
        self.registry.register(self.jobs)
        # The labelled children, found once per (route, method, status): `labels()`
        # validates and locks at every call, a few microseconds a request.  As
        # many entries as the counter has children.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def add_gauge(self, name: str, help_: str, read: Any) -> None:
        """A value owned elsewhere (listener connected, followers), read at scrape time."""
        self.registry.register(_Callback(name, help_, read))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)), self.latency.labels(route)
            )
        children[0].inc()
        children[1].observe(seconds)

    async def render(self, pool: asyncpg.Pool, within: float) -> bytes:
        await self.jobs.refresh(pool, within)
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, name: str, help_: str, read: Any) -> None:
        self.name, self.help, self.read = name, help_, read

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.help, value=float(self.read()))
