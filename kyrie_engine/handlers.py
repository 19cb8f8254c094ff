"""The job handlers a stock `kyrie-engine worker`/`serve` runs, by kind."""

from __future__ import annotations

from typing import Any

from kyrie_engine.settings import Settings


def default_handlers(settings: Settings) -> dict[str, Any]:
    """Filled in by the CFO work: {"cfo.analyze": <handler>}."""
    return {}
