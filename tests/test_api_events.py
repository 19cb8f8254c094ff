"""The shared LISTEN connection: one per process, fanned out by job id, back after a restart."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from kyrie_engine.embedded import EmbeddedPostgres
from kyrie_engine.events import CHANNEL, JobEvents


async def _notify(conn: asyncpg.Connection, payload: str) -> None:
    await conn.execute("select pg_notify($1, $2)", CHANNEL, payload)


async def test_a_notification_wakes_only_the_followers_of_its_job(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    events = JobEvents(db_dsn)
    events.start()
    try:
        assert await events.wait_connected(30)
        mine, other = uuid.uuid4(), uuid.uuid4()
        with events.follow(mine) as first, events.follow(mine) as second, events.follow(other) as third:
            assert events.follower_count == 3
            await first.changed(within=0.01)  # the wake-up every (re)connect gives
            await second.changed(within=0.01)
            await third.changed(within=0.01)
            await _notify(db, "not json")  # ignored, and the listener lives on
            await _notify(db, json.dumps({"id": str(mine), "status": "running"}))
            assert await first.changed(within=10)
            assert await second.changed(within=10)
            assert not await third.changed(within=0.3)
        assert events.follower_count == 0
        listeners = await db.fetchval(
            "select count(*) from pg_stat_activity"
            " where datname = current_database() and query ilike 'listen%'"
        )
        assert listeners == 1
    finally:
        await events.stop()


async def test_the_listener_reconnects_after_a_restart_and_wakes_everyone(
    own_server: EmbeddedPostgres,
) -> None:
    dsn = own_server.dsn_for("kyrie")
    events = JobEvents(dsn, check_interval=0.5, timeout=2, max_backoff=0.5)
    events.start()
    try:
        assert await events.wait_connected(30)
        job = uuid.uuid4()
        with events.follow(job) as follower:
            await follower.changed(within=0.01)
            await asyncio.to_thread(own_server.stop)
            await asyncio.sleep(1)
            assert not events.connected
            await asyncio.to_thread(own_server.start)
            assert await events.wait_connected(30)
            # Notifications sent while nobody listened are lost: followers re-read.
            assert await follower.changed(within=10)
            conn = await asyncpg.connect(dsn)
            try:
                await _notify(conn, json.dumps({"id": str(job), "status": "completed"}))
            finally:
                await conn.close()
            assert await follower.changed(within=10)
    finally:
        await events.stop()
