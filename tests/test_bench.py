"""`kyrie-engine bench`: what it refuses, and how it reports a comparison (its figures are measured by
running it, never asserted here)."""

from __future__ import annotations

import pytest

from kyrie_engine import bench
from kyrie_engine.bench import peers


def test_peers_without_pgqueuer_says_so_and_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(peers, "pgqueuer_version", lambda: None)
    assert bench.main(["--peers"]) != 0
    assert "PgQueuer is not installed" in capsys.readouterr().err


def test_the_peers_table_has_medians_and_ratios_of_kyrie_over_each_peer() -> None:
    def figures(drain: float, p50: float, enqueue: float, shape: str | None = None) -> peers.FigureSet:
        row: peers.FigureSet = {"drain_jobs_per_s": drain, "pickup_p50_ms": p50, "pickup_p99_ms": 2 * p50,
                                "enqueue_jobs_per_s": enqueue}
        if shape:
            row["drain_shape"] = shape
        return row

    text, flat = peers.table({
        "kyrie-engine": [figures(20_000, 1.0, 6_000), figures(30_000, 9.0, 6_000), figures(21_000, 1.2, 0)],
        "PgQueuer": [figures(10_000, 1.0, 3_000, "1x100")],
        "bare": [figures(40_000, 0.6, 4_000, "4x125")],
    })
    assert flat["peers_kyrie_engine_drain_jobs_per_s"] == 21_000  # the median round, not the best
    assert flat["peers_ratio_kyrie_pgqueuer_drain_jobs_per_s"] == 2.1
    assert flat["peers_ratio_kyrie_bare_enqueue_jobs_per_s"] == 1.5
    assert flat["peers_ratio_kyrie_bare_pickup_p50_ms"] == 2.0
    lines = text.splitlines()
    assert lines[0].split()[0] == "system" and "PgQueuer (drain 1x100)" in text
    assert [line.split()[0] for line in lines[-2:]] == ["kyrie/PgQueuer", "kyrie/bare"]
    assert "2.10x" in lines[-2]
