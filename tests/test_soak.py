"""A smoke of the soak benchmark (`kyrie-engine bench --only soak` runs 1,000,000):
the same producer, worker process and retention, on 2,000 jobs."""

from __future__ import annotations

import datetime as dt

from kyrie_engine.bench import soak


async def test_a_small_soak_drains_everything_and_reports_its_figures(db_dsn: str) -> None:
    figures = await soak.soak(db_dsn, 2_000, keep=dt.timedelta(seconds=1), backlog=500)
    assert figures["soak_jobs"] == 2_000
    assert figures["soak_first_tenth_jobs_per_s"] > 0 and figures["soak_last_tenth_jobs_per_s"] > 0
    assert figures["soak_table_bytes_end"] > 0
    assert 0 <= figures["soak_purged"] <= 2_000
