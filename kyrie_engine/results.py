"""The shapes of what jobs write for the app to read: `jobs.result`, `jobs.progress`,
`jobs.usage` per kind, and `ai_actions.payload` per action type.

In the database these are `jsonb`, so the Next.js app's generated Supabase
types say `Json`.  These models are what `kyrie-engine schema` turns into
JSON Schema (and the app into TypeScript).  The figures' fields are not
written a second time: they come from the tables the report and its checker
already use (kyrie_engine.agents.report: CONTRACT_FIELDS, TOTAL_FIELDS,
ANOMALY_FIELDS, ACTION_RULES), so a figure added there appears here.  Every
figure may be null (a contract without a budget has no budget_used_pct), and
every key is always present: `number | null`, never optional.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from kyrie_engine.agents.report import (
    ACTION_RULES,
    ANOMALY_FIELDS,
    CONTRACT_FIELDS,
    TOTAL_FIELDS,
    Style,
)

# How each style of figure is written into the JSON (kyrie_engine.agents.figures.plain).
_STYLE_TYPES: dict[Style, Any] = {
    "money": float | None,
    "hours": float | None,
    "percent": float | None,
    "count": int,
    "date": dt.date | None,
    "yes/no": bool | None,
    "text": str | None,
}


class _Shape(BaseModel):
    # Closed: a key the engine starts writing must be added here (and to the app's types).
    model_config = ConfigDict(extra="forbid")


def _model(name: str, doc: str, fields: dict[str, Style], **extra: Any) -> type[_Shape]:
    definitions: dict[str, Any] = {key: (_STYLE_TYPES[style], ...) for key, style in fields.items()}
    definitions.update(extra)
    model = create_model(name, __base__=_Shape, __doc__=doc, **definitions)
    return model


ContractFigures = _model(
    "ContractFigures", "One contract's figures for the period (kyrie.contract_figures).",
    CONTRACT_FIELDS, contract_id=(uuid.UUID, ...),
)
CurrencyTotals = _model(
    "CurrencyTotals", "The period's totals in one currency (kyrie.currency_totals).", TOTAL_FIELDS,
)
Anomaly = _model(
    "Anomaly", "A pattern in the worklogs worth a look (kyrie.worklog_anomalies).", ANOMALY_FIELDS,
    contract_id=(uuid.UUID | None, ...), user_id=(uuid.UUID | None, ...),
)


def _payload_model(action_type: str) -> type[_Shape]:
    rule = ACTION_RULES[action_type]
    name = "".join(part.title() for part in action_type.split("_")) + "Payload"
    extra: dict[str, Any] = {"period_start": (dt.date, ...), "period_end": (dt.date, ...)}
    if action_type == "log_missing_time":
        extra["anomalies"] = (list[Anomaly], ...)  # type: ignore[valid-type]
    return _model(name, f"`ai_actions.payload` of a `{action_type}` action: {rule.when}.",
                  {key: CONTRACT_FIELDS[key] for key in rule.payload}, **extra)


# ai_actions.payload, per ai_actions.type.
ACTION_PAYLOADS: dict[str, type[_Shape]] = {t: _payload_model(t) for t in ACTION_RULES}


def _action_model(action_type: str) -> type[_Shape]:
    name = "".join(part.title() for part in action_type.split("_")) + "Action"
    return create_model(
        name, __base__=_Shape, __doc__=f"A proposed `{action_type}` action, as the result lists it.",
        id=(uuid.UUID, ...), type=(Literal[action_type], ...), contract_id=(uuid.UUID, ...),
        title=(str, ...), reason=(str, ...), payload=(ACTION_PAYLOADS[action_type], ...),
    )


def _proposed_action() -> Any:
    """A union over the action types, told apart by `type` (TypeScript narrows on it)."""
    models = tuple(_action_model(t) for t in ACTION_RULES)
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    return Annotated[union, Field(discriminator="type")]


ProposedAction = _proposed_action()


class Period(_Shape):
    start: dt.date
    end: dt.date


class Citation(_Shape):
    """A figure the narrative cites (`[[ref.figure]]`), with the value the engine wrote for it."""

    ref: str
    figure: str
    value: str | float | int | bool | None
    contract_id: uuid.UUID | None = None
    currency: str | None = None
    anomaly: int | None = None


class ToolCall(_Shape):
    tool: str
    arguments: dict[str, Any]
    rows: int


class Timings(_Shape):
    wall: float
    sql: float
    agent: float
    model: float | None


class CFOResult(_Shape):
    """`jobs.result` of a completed `cfo.analyze` job."""

    period: Period
    contract_ids: list[uuid.UUID] | None
    narrative: str
    figures: list[ContractFigures]  # type: ignore[valid-type]
    totals: list[CurrencyTotals]  # type: ignore[valid-type]
    anomalies: list[Anomaly]  # type: ignore[valid-type]
    citations: list[Citation]
    actions: list[ProposedAction]  # type: ignore[valid-type]
    model: str
    questions: int
    tool_calls: list[ToolCall]
    timings_ms: Timings


class JobProgress(_Shape):
    """`jobs.progress` of any kind, as JobContext.progress writes it."""

    step: str
    percent: float | None


class ModelUsage(_Shape):
    """`jobs.usage` of a `cfo.analyze` job: the model's tokens (estimated offline)."""

    model: str
    questions: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    requests: int | None = None
    estimated: bool | None = None


class JobShapes(BaseModel):
    result: type[BaseModel]
    progress: type[BaseModel]
    usage: type[BaseModel]


# Per job kind: the models of what its jobs write.
JOB_SHAPES: dict[str, JobShapes] = {
    "cfo.analyze": JobShapes(result=CFOResult, progress=JobProgress, usage=ModelUsage),
}


def check_cfo_result(result: dict[str, Any]) -> None:
    """Raise (pydantic.ValidationError) unless `result` has the published shape; its
    actions' payloads included.  Called by the CFO handler before it completes a job."""
    CFOResult.model_validate(result)
