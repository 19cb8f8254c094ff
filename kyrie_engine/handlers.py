"""The job handlers a stock `kyrie-engine worker`/`serve` runs, by kind.

Cheap to import: the CFO handler imports CrewAI and its model only when the
first analysis runs (in the thread that runs the agent).
"""

from __future__ import annotations

from typing import Any

from kyrie_engine.settings import Settings


def default_handlers(settings: Settings) -> dict[str, Any]:
    """`cfo.analyze` with the model the settings choose (KYRIE_LLM: groq or offline)."""
    from kyrie_engine.agents.cfo import KIND, CFOAnalysis

    return {KIND: CFOAnalysis.from_settings(settings)}
