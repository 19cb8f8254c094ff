"""The HTTP API's bodies, as pydantic models: the edge where input is validated.

Requests are strict (a JSON string for a uuid or a date, nothing coerced from a
number) and closed (`extra="forbid"`: a misspelt field is an error, not a field
quietly ignored).  The same models generate the OpenAPI document, so the
document and the validation cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

MAX_CONTRACT_IDS = 500
# Dates an analysis may cover: wide enough for any real book, narrow enough
# that no date arithmetic downstream (a default 90-day window, a budget's
# projected end) can leave the calendar.  A year-9999 period used to be
# accepted here and overflow in the worker, retried with tokens spent each time.
EARLIEST_DATE = dt.date(2000, 1, 1)
LATEST_DATE = dt.date(2100, 12, 31)
MAX_PERIOD_DAYS = 3 * 366 + 365  # four years, both ends included


class AnalyzeRequest(BaseModel):
    """Ask for a CFO analysis of a workspace on behalf of one of its members."""

    model_config = ConfigDict(strict=True, extra="forbid")

    workspace_id: UUID
    user_id: UUID = Field(description="The Supabase user the Next.js route handler authenticated.")
    contract_ids: list[UUID] | None = Field(
        default=None, min_length=1, max_length=MAX_CONTRACT_IDS,
        description="Limit the analysis to these contracts (null: all of the workspace's)."
    )
    period_start: dt.date | None = Field(default=None, ge=EARLIEST_DATE, le=LATEST_DATE)
    period_end: dt.date | None = Field(default=None, ge=EARLIEST_DATE, le=LATEST_DATE)

    @model_validator(mode="after")
    def _period_in_order(self) -> AnalyzeRequest:
        if self.period_start and self.period_end:
            if self.period_end < self.period_start:
                raise ValueError("period_end must not be before period_start")
            if (self.period_end - self.period_start).days + 1 > MAX_PERIOD_DAYS:
                raise ValueError(f"a period spans at most {MAX_PERIOD_DAYS} days")
        return self

    def payload(self) -> dict[str, Any]:
        """The job's payload: the contract of kind `cfo.analyze`."""
        return {
            "contract_ids": None if self.contract_ids is None else [str(c) for c in self.contract_ids],
            "period_start": None if self.period_start is None else self.period_start.isoformat(),
            "period_end": None if self.period_end is None else self.period_end.isoformat(),
        }


class JobAccepted(BaseModel):
    job_id: UUID


class JobView(BaseModel):
    """What a caller may know about a job: its state, never its lease."""

    id: UUID
    kind: str
    status: JobStatus
    workspace_id: UUID | None
    user_id: UUID | None
    progress: dict[str, Any] | None = None
    attempts: int
    max_attempts: int
    result: Any = None
    error: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    run_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None

    @classmethod
    def of(cls, job: BaseModel) -> JobView:
        """From kyrie_engine.queue.Job, leaving out what is the queue's business (lease, payload)."""
        return cls.model_validate(job.model_dump(include=set(cls.model_fields)))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class ErrorBody(BaseModel):
    """Every error: the app's toasts show `message`."""

    message: str
    request_id: str


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `contract_ids.2`.")
    message: str


class ValidationErrorBody(ErrorBody):
    errors: list[FieldError]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool | str]


class NotReady(ErrorBody):
    checks: dict[str, bool | str]
