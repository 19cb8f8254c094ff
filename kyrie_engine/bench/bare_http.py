"""The HTTP ceiling: a bare Starlette + asyncpg app doing one `INSERT ... RETURNING` per request.

What any accept endpoint on this stack costs at least: parse the JSON body,
one round trip that inserts the job, answer 202 with its id.  No secret, no
membership check, no wake-up: its connections set `kyrie.wake_after_commit`,
so the jobs table's insert trigger sends no NOTIFY either (a NOTIFY inside
each commit takes a global lock and serialises the commits: the trap the
engine's shared after-commit wake-up avoids, not a cost of the ceiling).

Served by uvicorn as `kyrie-engine api` is: httptools on uvloop (uvicorn's own
choice here, and kyrie_engine.service's), access log off, the same pool size;
so the ratio of the two measures our code, not the server.  (Until
2026-12-02 the API ran uvicorn's h11 protocol on asyncio's loop, and the
ratio counted that too.)

Run as `python -m kyrie_engine.bench.bare_http` with DATABASE_URL,
KYRIE_HOST, KYRIE_PORT and KYRIE_POOL_SIZE in the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_INSERT = """
insert into public.jobs (kind, workspace_id, user_id, payload)
values ('cfo.analyze', $1::uuid, $2::uuid, $3::text::jsonb)
returning id
"""


def build_app(dsn: str, pool_size: int) -> Starlette:
    pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size,
                                         server_settings={"kyrie.wake_after_commit": "on"})
        try:
            yield
        finally:
            await pool.close()

    async def analyze(request: Request) -> JSONResponse:
        body = await request.json()
        assert pool is not None
        job_id = await pool.fetchval(
            _INSERT, body["workspace_id"], body["user_id"], (await request.body()).decode()
        )
        return JSONResponse({"job_id": str(job_id)}, status_code=202)

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"ready": pool is not None})

    return Starlette(
        routes=[Route("/ai/cfo/analyze", analyze, methods=["POST"]), Route("/readyz", readyz)],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    app = build_app(os.environ["DATABASE_URL"], int(os.environ.get("KYRIE_POOL_SIZE", "10")))
    uvicorn.run(app, host=os.environ.get("KYRIE_HOST", "127.0.0.1"), port=int(os.environ["KYRIE_PORT"]),
                log_level="warning", access_log=False, server_header=False)


if __name__ == "__main__":
    main()
