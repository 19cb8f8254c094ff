"""The engine's agents: the CFO analysis (`cfo.analyze` jobs).

Read in this order: `figures` (the SQL the tools run, as the requesting
user), `report` (what the model must answer, and how it is checked against
those figures), `tools` and `crew` (the CrewAI side), `cfo` (the job handler).
The models are `offline_llm` (deterministic, no network) and `groq_llm`.

CrewAI is heavy to import (seconds) and, left to itself, would send
telemetry and traces and look for newer versions of itself on PyPI.  Only
`tools`, `crew` and the two model modules import it, and importing this
package first switches all of that off: the variables below are the ones
crewai 1.x reads (crewai_core.telemetry, crewai.execution,
crewai.events.listeners.tracing.utils, crewai.events.utils.console_formatter),
and they are forced rather than defaulted because the engine must never phone
home whatever the environment says.
"""

from __future__ import annotations

import os

CREWAI_OFFLINE_ENV: dict[str, str] = {
    "CREWAI_DISABLE_TELEMETRY": "true",  # anonymous usage telemetry (OTLP to CrewAI)
    "CREWAI_DISABLE_TRACKING": "true",  # the same switch under its other name
    "OTEL_SDK_DISABLED": "true",  # OpenTelemetry SDK, honoured by crewai's telemetry too
    "CREWAI_TRACING_ENABLED": "false",  # execution traces uploaded to CrewAI AMP
    "CREWAI_DISABLE_VERSION_CHECK": "true",  # PyPI look-up for a newer crewai
}

os.environ.update(CREWAI_OFFLINE_ENV)
