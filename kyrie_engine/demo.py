"""`kyrie-engine demo`: one CFO analysis, end to end, the way KyrieOS runs it.

Every hop is the production one, so a green demo means the parts fit:

1. a database: `DATABASE_URL` when set, otherwise a throwaway embedded
   PostgreSQL (removed on exit);
2. the schema, applied by the same migrator the operator runs;
3. a sample studio (kyrie_engine.seed) with a contract over budget and
   unbilled time;
4. `kyrie-engine serve` started as a child process on a free loopback port
   with a freshly generated secret, exactly as it runs beside Next.js;
5. `POST /ai/cfo/analyze` sent the way the Next.js route handler sends it
   (the secret header, the signed-in user's id), answered with `{job_id}`;
6. the job followed live over the SSE route until it is terminal;
7. the report printed as tables, with the proposed actions read back from
   `ai_actions` to show their link to the job.

The model is the offline one unless a Groq key is in the environment (or
`--llm groq` is given, which then requires it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx

from kyrie_engine.migrate import migrate_dsn
from kyrie_engine.seed import SeededWorkspace, seed_studio
from kyrie_engine.terminal import table

READY_TIMEOUT_SECONDS = 60.0
JOB_TIMEOUT_SECONDS = 300.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _database() -> Iterator[str]:
    """The user's DATABASE_URL, or an embedded server that lives as long as the demo."""
    if os.environ.get("DATABASE_URL"):
        _say("database   DATABASE_URL from the environment")
        yield os.environ["DATABASE_URL"]
        return
    from kyrie_engine.embedded import EmbeddedPostgres

    started = time.perf_counter()
    server = EmbeddedPostgres()
    server.start()
    try:
        _say(f"database   embedded PostgreSQL on 127.0.0.1:{server.port} "
             f"(started in {time.perf_counter() - started:.1f}s, removed on exit)")
        yield server.dsn
    finally:
        server.stop()
        server.cleanup()


@contextlib.asynccontextmanager
async def _service(dsn: str, llm: str, secret: str, port: int) -> AsyncIterator[str]:
    """`kyrie-engine serve` in a child process; stopped with SIGTERM, as an orchestrator would."""
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "KYRIE_INTERNAL_SECRET": secret,
        "KYRIE_LLM": llm,
        "KYRIE_HOST": "127.0.0.1",
        "KYRIE_PORT": str(port),
        "KYRIE_LOG_LEVEL": os.environ.get("KYRIE_LOG_LEVEL", "warning"),
    }
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "kyrie_engine.cli", "serve", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base, child)
        yield base
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), timeout=30)
            except TimeoutError:
                child.kill()
                await child.wait()


async def _wait_ready(base: str, child: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if child.returncode is not None:
                raise RuntimeError(f"kyrie-engine serve exited with status {child.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"kyrie-engine serve was not ready after {READY_TIMEOUT_SECONDS:.0f}s")


async def _follow(client: httpx.AsyncClient, base: str, job_id: str, user_id: str) -> dict[str, Any]:
    """Print each state the SSE route sends; return the last (terminal) one."""
    last: dict[str, Any] = {}
    url = f"{base}/ai/jobs/{job_id}/events"
    async with client.stream("GET", url, headers={"X-Kyrie-User-Id": user_id}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            job = json.loads(line.removeprefix("data:").strip())
            progress = job.get("progress") or {}
            step = progress.get("step") or progress.get("message") or ""
            pct = progress.get("percent")
            shown = f"{step} ({pct:g}%)" if isinstance(pct, int | float) else step
            _say(f"  event    {job['status']:<10} attempt {job['attempts']}/{job['max_attempts']}  {shown}")
            last = job
    return last


def _money(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.2f}"


def _report(result: dict[str, Any], actions: list[asyncpg.Record]) -> None:
    period = result["period"]
    _say(f"\nCFO report for {period['start']} to {period['end']} (model: {result['model']})\n")
    figures = sorted(result["figures"], key=lambda f: (f["currency"], f["title"]))
    _say(table(
        ["contract", "client", "billing", "cur", "hours", "billable", "budget used", "unbilled h",
         "unbilled", "eff. rate", "budget runs out"],
        [
            [f["title"], f["client_name"], f["billing_type"], f["currency"], _money(f["hours_logged"]),
             _money(f["billable_value"]),
             "-" if f.get("budget_used_pct") is None else f"{float(f['budget_used_pct']):.1f}%",
             _money(f["unbilled_hours"]), _money(f["unbilled_value"]),
             _money(f.get("effective_hourly_rate")), f.get("budget_exhausted_on") or "-"]
            for f in figures
        ],
        numeric=range(4, 10),
    ))
    _say("\nTotals per currency\n")
    _say(table(
        ["cur", "contracts", "hours", "billable", "unbilled h", "unbilled"],
        [[t["currency"], t.get("contracts", "-"), _money(t.get("hours_logged")),
          _money(t.get("billable_value")), _money(t.get("unbilled_hours")), _money(t.get("unbilled_value"))]
         for t in result["totals"]],
        numeric=range(1, 6),
    ))
    titles = {f["contract_id"]: f["title"] for f in figures}
    anomalies = result.get("anomalies") or []
    if anomalies:
        _say("\nWorklog anomalies\n")
        _say(table(
            ["kind", "contract", "occurrences", "hours", "from", "to"],
            [[a["kind"], titles.get(a.get("contract_id"), "(all)"), a["occurrences"], _money(a.get("hours")),
              a.get("first_date") or "-", a.get("last_date") or "-"] for a in anomalies],
            numeric=[2, 3],
        ))
    _say("\nNarrative\n")
    _say(result["narrative"])
    _say("\nProposed actions (public.ai_actions)\n")
    _say(table(
        ["type", "title", "status", "metadata.original_job_id"],
        [[a["type"], a["title"], a["status"], a["original_job_id"]] for a in actions],
    ))
    timings = result.get("timings_ms") or {}
    _say(f"\ntimings: wall {timings.get('wall')} ms (a process's first job also imports CrewAI), "
         f"SQL {timings.get('sql')} ms, agent loop {timings.get('agent')} ms; "
         f"questions asked: {result.get('questions')}")


async def _demo(llm: str) -> int:
    with _database() as dsn:
        applied = await migrate_dsn(dsn)
        _say(f"schema     {len(applied)} migration file(s) applied")
        conn = await asyncpg.connect(dsn)
        try:
            studio: SeededWorkspace = await seed_studio(conn, dt.datetime.now(dt.UTC).date())
            _say(f"seeded     workspace {studio.workspace_id}: {len(studio.contracts)} contracts, "
                 f"{studio.worklogs} worklogs")
            secret = secrets.token_urlsafe(48)
            async with _service(dsn, llm, secret, _free_port()) as base:
                _say(f"service    kyrie-engine serve at {base} (KYRIE_LLM={llm}, generated secret)")
                # What the Next.js backend sends (after checking the user's session): the
                # secret on every call, the signed-in user's id in the body or the query.
                async with httpx.AsyncClient(
                    headers={"X-Internal-Secret": secret},
                    timeout=httpx.Timeout(10.0, read=JOB_TIMEOUT_SECONDS),
                ) as client:
                    response = await client.post(
                        f"{base}/ai/cfo/analyze",
                        json={"workspace_id": str(studio.workspace_id), "user_id": str(studio.owner_id)},
                    )
                    if response.status_code != 202:
                        _say(f"POST /ai/cfo/analyze answered {response.status_code}: {response.text}")
                        return 1
                    job_id = response.json()["job_id"]
                    _say(f"request    POST /ai/cfo/analyze -> 202 job_id={job_id}")
                    job = await _follow(client, base, job_id, str(studio.owner_id))
            if job.get("status") != "completed":
                _say(f"\nthe job ended {job.get('status')}: {job.get('error')}")
                return 1
            actions = await conn.fetch(
                "select type, title, status, metadata ->> 'original_job_id' as original_job_id"
                " from public.ai_actions where job_id = $1 order by created_at, type",
                job_id,
            )
            _report(job["result"], actions)
            return 0
        finally:
            await conn.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kyrie-engine demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llm", choices=("offline", "groq"), default="groq" if os.environ.get("GROQ_API_KEY") else "offline",
        help="the model (default: groq when GROQ_API_KEY is set, else offline)",
    )
    args = parser.parse_args(argv)
    if args.llm == "groq" and not os.environ.get("GROQ_API_KEY"):
        print("kyrie-engine demo: --llm groq needs GROQ_API_KEY in the environment", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_demo(args.llm))
    except (RuntimeError, OSError, asyncpg.PostgresError, httpx.HTTPError) as exc:
        print(f"kyrie-engine demo: {exc}", file=sys.stderr)
        return 1
