"""HTTP section: `POST /ai/cfo/analyze` at concurrency 50 against a real `kyrie-engine api`.

The server is the real command in a process of its own (the client would
otherwise share its event loop and the figure would measure both), on a free
loopback port, with a generated secret.  Every request is a full one: secret
check, body validation, membership asked of the database as the user, enqueue.
Afterwards every returned job id must be in `jobs` exactly once.  The client is
Python too (50 httpx clients of one connection each), so on a small machine it
takes its share of the CPU the server would otherwise have.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

CONCURRENCY = 50


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


async def _wait_ready(client: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"kyrie-engine api exited with {proc.returncode}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("kyrie-engine api did not become ready")


async def _load(
    base_url: str, secret: str, pairs: list[tuple[str, str]], total: int
) -> tuple[list[float], list[str], int]:
    """50 clients of one keep-alive connection each (one shared pool of 50 measures httpx's
    pool as much as the server: its waiters are served unfairly and fatten the tail)."""
    latencies: list[float] = []
    job_ids: list[str] = []
    errors = 0
    next_index = 0

    async def one_client() -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
            await requests(client)

    async def requests(client: httpx.AsyncClient) -> None:
        nonlocal errors, next_index
        while next_index < total:
            i = next_index
            next_index += 1
            workspace, user = pairs[i % len(pairs)]
            body = {"workspace_id": workspace, "user_id": user, "period_start": "2026-01-01"}
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/ai/cfo/analyze", json=body, headers={"X-Internal-Secret": secret}
                )
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            if response.status_code == 202:
                job_ids.append(response.json()["job_id"])
            else:
                errors += 1

    await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
    return latencies, job_ids, errors


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(dsn: str, quick: bool) -> dict[str, Any]:
    total = 400 if quick else 4000
    pairs = await _members(dsn, 10)
    secret = secrets.token_urlsafe(32)
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "KYRIE_INTERNAL_SECRET": secret,
        "KYRIE_LLM": "offline",
        "KYRIE_HOST": "127.0.0.1",
        "KYRIE_PORT": str(port),
        "KYRIE_LOG_LEVEL": "warning",  # the access line per request is not what is measured
    }
    command = [str(Path(sys.executable).parent / "kyrie-engine"), "api"]
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            await _wait_ready(client, proc)
        print(f"http: kyrie-engine api on port {port}; {total} requests at concurrency {CONCURRENCY}",
              file=sys.stderr)
        await _load(base_url, secret, pairs, min(200, total // 4))  # warm-up: the server's pool
        started = time.perf_counter()
        latencies, job_ids, errors = await _load(base_url, secret, pairs, total)
        elapsed = time.perf_counter() - started
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("select id::text as id from public.jobs where id = any($1::uuid[])", job_ids)
    finally:
        await conn.close()
    present = {row["id"] for row in found}
    figures = {
        "http_requests": total,
        "http_rps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "http_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else 0.0,
        "http_p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "http_errors": errors,
        # Every id answered must be a job of its own: none missing, none handed out twice.
        "http_jobs_missing": len(set(job_ids) - present),
        "http_jobs_duplicated": len(job_ids) - len(set(job_ids)),
    }
    print(
        f"http: {figures['http_rps']} req/s, p50 {figures['http_p50_ms']} ms, "
        f"p99 {figures['http_p99_ms']} ms, {errors} errors, {figures['http_jobs_missing']} job ids missing",
        file=sys.stderr,
    )
    return figures
