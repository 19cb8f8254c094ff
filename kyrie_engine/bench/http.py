"""HTTP section: `POST /ai/cfo/analyze` at 50 connections, kyrie-engine beside its ceiling.

Two servers, one after the other, each the real thing in a process of its
own on a free loopback port:

- `kyrie-engine api`: every request is a full one (secret check, body
  validation, membership asked of the database as the user, enqueue);
- the ceiling, `kyrie_engine.bench.bare_http`: Starlette + asyncpg doing one
  `INSERT ... RETURNING` per request and nothing else (no NOTIFY), served by
  uvicorn the same way.

The client is `wrk` when it is on PATH (a C load generator: 2 threads, 50
connections, a Lua script that cycles through the members' request bodies
and records every job id a 202 returned).  Without it the bench falls back to
a Python client (50 httpx clients of one connection each) and says so: that
client shares the CPU with the server, so its figures are a floor, and only
the ratio between the two servers means much.  KYRIE_BENCH_WRK names another
binary (or a missing one, to force the fallback).

After each run, every job id answered must be in `jobs` exactly once, and
the table must have grown by exactly the number of 202s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

CONCURRENCY = 50
WRK_THREADS = 2
POOL_SIZE = 10  # the API's default KYRIE_POOL_SIZE; the bare app gets the same
# wrk stops with up to CONCURRENCY requests in flight: they still commit their job, and
# wrk never sees the answer.  Counting waits for them, and reports them apart.
SETTLE_S = 1.0

# Cycles through the bodies in KYRIE_WRK_BODIES (one per line); counts answers by
# status and keeps each 202's job id; done() writes them to KYRIE_WRK_OUT as JSON.
_WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end

function init(args)
  requests, ids, accepted, refused, n = {}, {}, 0, 0, 0
  local headers = {["Content-Type"] = "application/json",
                   ["X-Internal-Secret"] = os.getenv("KYRIE_WRK_SECRET")}
  for line in io.lines(os.getenv("KYRIE_WRK_BODIES")) do
    table.insert(requests, wrk.format("POST", "/ai/cfo/analyze", headers, line))
  end
end

function request()
  n = n + 1
  return requests[(n % #requests) + 1]
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
    ids[accepted] = string.match(body, '"job_id"%s*:%s*"([%x%-]+)"') or ""
  else
    refused = refused + 1
  end
end

function done(summary, latency, requests)
  local all, refused_total = {}, 0
  for _, t in ipairs(threads) do
    for _, id in ipairs(t:get("ids")) do table.insert(all, '"' .. id .. '"') end
    refused_total = refused_total + t:get("refused")
  end
  local e = summary.errors
  local out = io.open(os.getenv("KYRIE_WRK_OUT"), "w")
  out:write(string.format(
    '{"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "refused": %d, ' ..
    '"socket_errors": %d, "ids": [%s]}',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    refused_total, e.connect + e.read + e.write + e.timeout, table.concat(all, ",")))
  out:close()
end
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _members(dsn: str, count: int) -> list[tuple[str, str]]:
    """(workspace_id, user_id) pairs: a few workspaces, each with its owner."""
    conn = await asyncpg.connect(dsn)
    try:
        pairs = []
        for i in range(count):
            user = await conn.fetchval(
                "insert into auth.users (email) values ($1) returning id", f"bench-http-{i}@example.test"
            )
            workspace = await conn.fetchval(
                "insert into public.workspaces (name, created_by) values ($1, $2) returning id",
                f"Bench {i}", user,
            )
            pairs.append((str(workspace), str(user)))
        return pairs
    finally:
        await conn.close()


def _body(pair: tuple[str, str]) -> dict[str, str]:
    return {"workspace_id": pair[0], "user_id": pair[1], "period_start": "2026-01-01"}


@contextlib.asynccontextmanager
async def _server(command: list[str], env: dict[str, str], base_url: str) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"{command[-1]} exited with {proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[-1]} did not become ready")
                await asyncio.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class Load:
    """One measured run: what the client saw, and the job ids it was given."""

    def __init__(self, seconds: float, latencies_ms: tuple[float, float], requests: int,
                 errors: int, job_ids: list[str]) -> None:
        self.seconds = seconds
        self.p50_ms, self.p99_ms = latencies_ms
        self.requests = requests
        self.errors = errors
        self.job_ids = job_ids

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _wrk_files(tmp: str, pairs: list[tuple[str, str]]) -> tuple[Path, Path, Path]:
    script, bodies, out = Path(tmp, "post.lua"), Path(tmp, "bodies"), Path(tmp, "out.json")
    script.write_text(_WRK_SCRIPT)
    bodies.write_text("".join(json.dumps(_body(p)) + "\n" for p in pairs))
    return script, bodies, out


def _wrk_result(out: Path) -> dict[str, Any] | None:
    return dict(json.loads(out.read_text())) if out.exists() else None


async def _load_wrk(wrk: str, base_url: str, secret: str, pairs: list[tuple[str, str]],
                    seconds: float) -> Load:
    with tempfile.TemporaryDirectory(prefix="kyrie-wrk-") as tmp:
        script, bodies, out = await asyncio.to_thread(_wrk_files, tmp, pairs)
        env = {**os.environ, "KYRIE_WRK_SECRET": secret, "KYRIE_WRK_BODIES": str(bodies),
               "KYRIE_WRK_OUT": str(out)}
        proc = await asyncio.create_subprocess_exec(
            wrk, f"-t{WRK_THREADS}", f"-c{CONCURRENCY}", f"-d{seconds:g}s", "--timeout", "10s",
            "-s", str(script), base_url, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        result = await asyncio.to_thread(_wrk_result, out)
        if proc.returncode != 0 or result is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return Load(result["seconds"], (result["p50_us"] / 1000, result["p99_us"] / 1000), result["requests"],
                result["refused"] + result["socket_errors"], result["ids"])


async def _load_httpx(base_url: str, secret: str, pairs: list[tuple[str, str]], total: int) -> Load:
    """50 clients of one keep-alive connection each (one shared pool of 50 measures httpx's
    pool as much as the server: its waiters are served unfairly and fatten the tail)."""
    latencies: list[float] = []
    job_ids: list[str] = []
    errors = 0
    next_index = 0

    async def one_client() -> None:
        nonlocal errors, next_index
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
            while next_index < total:
                i = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/ai/cfo/analyze", json=_body(pairs[i % len(pairs)]),
                                                 headers={"X-Internal-Secret": secret})
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if response.status_code == 202:
                    job_ids.append(response.json()["job_id"])
                else:
                    errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    return Load(elapsed, (statistics.median(latencies) * 1000 if latencies else 0.0,
                          _percentile(latencies, 0.99) * 1000), len(latencies), errors, job_ids)


async def _job_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select count(*) from public.jobs"))
    finally:
        await conn.close()


async def _check_jobs(dsn: str, load: Load, before: int) -> dict[str, int]:
    """Every id answered is a job of its own; `unanswered` counts the jobs made for requests
    still in flight when the client stopped (at most CONCURRENCY per run)."""
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetchval("select count(*) from public.jobs where id = any($1::uuid[])",
                                    list(set(load.job_ids)))
        after = await conn.fetchval("select count(*) from public.jobs")
    finally:
        await conn.close()
    return {
        "missing": len(set(load.job_ids)) - int(found),
        "duplicated": len(load.job_ids) - len(set(load.job_ids)),
        "unanswered": int(after) - before - len(load.job_ids),
    }


async def _measure(target: str, dsn: str, secret: str, pairs: list[tuple[str, str]], wrk: str | None,
                   quick: bool) -> tuple[Load, dict[str, int]]:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "KYRIE_INTERNAL_SECRET": secret,
        "KYRIE_LLM": "offline",
        "KYRIE_HOST": "127.0.0.1",
        "KYRIE_PORT": str(port),
        "KYRIE_POOL_SIZE": str(POOL_SIZE),
        "KYRIE_LOG_LEVEL": "warning",  # the access line per request is not what is measured
    }
    if target == "kyrie":
        command = [str(Path(sys.executable).parent / "kyrie-engine"), "api"]
    else:
        command = [sys.executable, "-m", "kyrie_engine.bench.bare_http"]
    base_url = f"http://127.0.0.1:{port}"
    async with _server(command, env, base_url):
        # Warm-up (the server's pool, the planner's caches), then the measured run.
        if wrk:
            await _load_wrk(wrk, base_url, secret, pairs, 1 if quick else 2)
        else:
            await _load_httpx(base_url, secret, pairs, 100 if quick else 200)
        await asyncio.sleep(SETTLE_S)
        before = await _job_count(dsn)
        if wrk:
            load = await _load_wrk(wrk, base_url, secret, pairs, 3 if quick else 10)
        else:
            load = await _load_httpx(base_url, secret, pairs, 400 if quick else 4000)
        await asyncio.sleep(SETTLE_S)
    return load, await _check_jobs(dsn, load, before)


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    wrk = shutil.which(os.environ.get("KYRIE_BENCH_WRK", "wrk"))
    if wrk:
        client = f"wrk ({WRK_THREADS} threads, {CONCURRENCY} connections, {3 if quick else 10} s per run)"
    else:
        client = f"httpx ({CONCURRENCY} clients of one connection; wrk not found)"
        print("http: wrk is not installed (apt-get install -y wrk): FALLING BACK to the Python httpx "
              "client, which shares the CPU with the server; absolute figures are a floor, compare "
              "the ratio only", file=sys.stderr)
    pairs = await _members(dsn, 10)
    secret = secrets.token_urlsafe(32)
    runs = 1 if quick else 2
    loads: dict[str, list[Load]] = {"kyrie": [], "bare": []}
    checks = {"missing": 0, "duplicated": 0, "unanswered": 0}
    for r in range(runs):
        for target in ("kyrie", "bare"):
            load, check = await _measure(target, dsn, secret, pairs, wrk, quick)
            loads[target].append(load)
            for key, value in check.items():
                checks[key] += value
            name = "kyrie-engine api" if target == "kyrie" else "bare Starlette + asyncpg insert"
            print(f"http: run {r + 1}, {name}: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                  f"p99 {load.p99_ms:.2f} ms, {load.errors} errors; job ids missing {check['missing']}, "
                  f"duplicated {check['duplicated']}, requests cut off at the end {check['unanswered']}",
                  file=sys.stderr)

    def med(target: str, attr: str) -> float:
        return round(statistics.median(getattr(load, attr) for load in loads[target]), 2)

    figures: dict[str, Any] = {"http_client": client, "http_runs": runs}
    for target, prefix in (("kyrie", "http"), ("bare", "http_bare")):
        figures[f"{prefix}_rps"] = round(med(target, "rps"), 1)
        figures[f"{prefix}_p50_ms"] = med(target, "p50_ms")
        figures[f"{prefix}_p99_ms"] = med(target, "p99_ms")
        figures[f"{prefix}_errors"] = sum(load.errors for load in loads[target])
    figures["http_rps_vs_bare"] = round(figures["http_rps"] / figures["http_bare_rps"], 2)
    figures["http_p99_vs_bare"] = round(figures["http_p99_ms"] / figures["http_bare_p99_ms"], 2)
    # Every id answered must be a job of its own: none missing, none handed out twice.  Unanswered
    # jobs are requests wrk cut off at the end (<= 50 per run), not lost ones.
    figures["http_jobs_missing"] = checks["missing"]
    figures["http_jobs_duplicated"] = checks["duplicated"]
    figures["http_jobs_unanswered"] = checks["unanswered"]
    print(f"http ({client}): kyrie-engine {figures['http_rps']} req/s = {figures['http_rps_vs_bare']}x "
          f"bare ({figures['http_bare_rps']}); p99 {figures['http_p99_ms']} ms = "
          f"{figures['http_p99_vs_bare']}x bare ({figures['http_bare_p99_ms']} ms)", file=sys.stderr)
    return figures
