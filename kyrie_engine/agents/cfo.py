"""The `cfo.analyze` handler: one CFO analysis of one workspace, as one user.

    reading contracts   the payload gives the scope; the user must still be a member
    analysing           the CrewAI agent runs in a thread; its tools read the figures
                        as the user (RLS); its answer cites them by reference and
                        the engine writes every number; when it fails, the model
                        is asked again with the reason
    writing actions     in ONE transaction: the proposed ai_actions, and the job's
                        completion with the report and the model's token usage

Model calls are durable and paced (a GroqLLM bound to the job, see
`replay.py` and `budget.py`): answers already stored for this job are
replayed instead of asked again, and every request first takes its share of
the shared Groq budget, seeded from settings at the first job.

What happens to failures: a 429 (or a budget that asks for a long wait)
reschedules the job after the advised delay without using an attempt
(RetryLater); an answer that still fails the checks after `report_attempts`
questions, a refused request or a bad payload fail the job for good
(PermanentFailure: asking again would not help); anything else (Groq down
past the in-call retries, the database gone) fails the attempt and the queue
retries it with backoff.

This module does not import CrewAI: the models and the crew are imported in
the worker thread that runs the agent, on the first job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kyrie_engine.agents import budget
from kyrie_engine.agents.errors import ModelRateLimited, ModelRefused
from kyrie_engine.agents.figures import AnalysisRequest, FigureReader, Scope, plain
from kyrie_engine.agents.replay import JobModelCalls
from kyrie_engine.agents.report import (
    Ledger,
    RenderedReport,
    ReportInvalid,
    action_payload,
    check,
    parse_answer,
    unique_actions,
)
from kyrie_engine.context import JobContext, PermanentFailure, RetryLater
from kyrie_engine.queue import to_json
from kyrie_engine.results import check_cfo_result
from kyrie_engine.settings import Settings

KIND = "cfo.analyze"

# Makes a fresh model per job (token usage is per job); called in the agent's thread.
ModelFactory = Callable[[], Any]


def offline_model(**options: Any) -> ModelFactory:
    def make() -> Any:
        from kyrie_engine.agents.offline_llm import OfflineLLM

        return OfflineLLM(model="offline", **options)

    return make


def groq_model(api_key: str, model: str, base_url: str | None = None, **options: Any) -> ModelFactory:
    def make() -> Any:
        from kyrie_engine.agents.groq_llm import GroqLLM

        return GroqLLM(model=model, api_key=api_key, base_url=base_url, **options)

    return make


def model_from_settings(settings: Settings) -> tuple[ModelFactory, str]:
    if settings.llm == "offline":
        return offline_model(), "offline"
    settings.require_model_key()
    assert settings.groq_api_key is not None
    key = settings.groq_api_key.get_secret_value()
    return groq_model(key, settings.groq_model, settings.groq_base_url), settings.groq_model


@dataclass
class _Run:
    """What the agent's thread hands back across questions."""

    llm: Any = None
    crew_seconds: float = 0.0
    tool_sql_seconds: float = 0.0
    questions: int = 0
    ledger: Ledger = field(default_factory=Ledger)


def _ask(
    make_model: ModelFactory,
    run: _Run,
    reader: FigureReader,
    loop: asyncio.AbstractEventLoop,
    stop: threading.Event,
    feedback: str | None,
    calls: Any = None,
) -> str:
    """In the worker thread (where CrewAI is imported): build the model once per job, run the crew once."""
    from kyrie_engine.agents import crew
    from kyrie_engine.agents.tools import ToolRuntime

    if run.llm is None:
        run.llm = make_model()
        run.llm.bind_stop(stop)
        if calls is not None and hasattr(run.llm, "bind_calls"):  # the offline model has nothing to pay
            run.llm.bind_calls(calls)
    return crew.run(run.llm, ToolRuntime(reader, loop, run.ledger, stop), feedback)


NOT_VISIBLE = "<not visible>"


def _visible_arguments(arguments: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
    """The model's tool arguments as the result records them.  A contract id
    the tools did not return came from untrusted text (a worklog naming
    another tenant's contract, say): it read nothing, and it is not echoed."""
    contract_id = arguments.get("contract_id")
    if contract_id is None or any(str(known) == str(contract_id) for known in ledger.contracts):
        return arguments
    return {**arguments, "contract_id": NOT_VISIBLE}


class CFOAnalysis:
    """The handler (an async callable the worker awaits)."""

    def __init__(
        self,
        model: ModelFactory,
        *,
        model_name: str,
        report_attempts: int = 3,
        today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
        limits: budget.Limits | None = None,
        max_wait_seconds: float = 3.0,
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.report_attempts = report_attempts
        self.today = today
        self.limits = limits  # seeded into the shared budget at the first job (None: headers only)
        self.max_wait_seconds = max_wait_seconds
        self._seeded = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CFOAnalysis:
        model, name = model_from_settings(settings)
        limits = budget.Limits(
            rpm=settings.groq_rpm, tpm=settings.groq_tpm, rpd=settings.groq_rpd, tpd=settings.groq_tpd,
            window_seconds=settings.budget_window_seconds,
        )
        return cls(model, model_name=name, limits=limits, max_wait_seconds=settings.budget_max_wait_seconds)

    async def __call__(self, job: JobContext) -> None:
        started = time.perf_counter()
        scope = self._scope(job)
        reader = FigureReader(job.pool, scope)

        await job.progress("reading contracts", 5)
        if not await reader.can_read_workspace():
            raise PermanentFailure(f"user {scope.user_id} is not a member of workspace {scope.workspace_id}")
        reader.prefetch()  # the figures' one pass overlaps the agent's start
        if self.limits is not None and not self._seeded:
            await budget.seed(job.pool, self.model_name, self.limits)
            self._seeded = True

        stop = threading.Event()
        run = _Run()
        try:
            report = await self._analyse(job, reader, run, stop)
        except ModelRateLimited as exc:
            raise RetryLater(exc.retry_after, str(exc)) from None
        except ModelRefused as exc:
            raise PermanentFailure(str(exc)) from None
        finally:
            stop.set()  # a thread still running (the job was cancelled) stops at its next step

        await job.progress("writing actions", 90)
        actions = [
            {
                "id": uuid.uuid4(),
                "type": a.type,
                "contract_id": a.contract_id,
                "title": a.title,
                "reason": a.reason,
                "payload": action_payload(a, run.ledger, scope),
                "metadata": {"model": self.model_name, "attempt": job.attempt},
            }
            for a in unique_actions(report.actions)
        ]
        async with job.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "select id from kyrie.propose_actions($1, $2::text::jsonb)", job.id, to_json(actions)
            )
            assert len(rows) == len(actions)
            wall = time.perf_counter() - started
            result = self._result(scope, report, run, reader, actions, wall)
            check_cfo_result(result)  # the shape `kyrie-engine schema` publishes to the app
            await job.complete(conn, result, usage=self._usage(run))

    # -- steps ----------------------------------------------------------------

    def _scope(self, job: JobContext) -> Scope:
        if job.workspace_id is None or job.user_id is None:
            raise PermanentFailure(f"a {KIND} job needs a workspace_id and a user_id")
        try:
            request = AnalysisRequest.model_validate(job.payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise PermanentFailure(f"invalid {KIND} payload: {where}: {first['msg']}") from None
        try:
            return Scope.of(job.workspace_id, job.user_id, request, self.today())
        except (OverflowError, ValueError) as exc:
            # Dates whose window leaves the calendar (a payload written by hand,
            # or from before the API bounded them): no attempt can succeed.
            raise PermanentFailure(f"invalid {KIND} payload: the period cannot be resolved ({exc})") from None

    async def _analyse(
        self, job: JobContext, reader: FigureReader, run: _Run, stop: threading.Event
    ) -> RenderedReport:
        """Ask, check and render, ask again with the reason; the last reason is the job's error."""
        feedback: str | None = None
        loop = asyncio.get_running_loop()
        calls = JobModelCalls(
            job.pool, loop, job.id, job.attempt, self.model_name, stop, max_wait_seconds=self.max_wait_seconds
        )
        # CrewAI takes seconds to import, once per process: in the job's wall
        # time the first time, but not counted as the agent loop's.
        await asyncio.to_thread(importlib.import_module, "kyrie_engine.agents.crew")
        for question in range(1, self.report_attempts + 1):
            step = (
                "analysing"
                if question == 1
                else f"analysing (asking again, {question}/{self.report_attempts})"
            )
            await job.progress(step, 30 if question == 1 else 30 + 20 * (question - 1) / self.report_attempts)
            run.ledger = Ledger()
            sql_before = reader.sql_seconds
            asked = time.perf_counter()
            try:
                answer = await asyncio.to_thread(_ask, self.model, run, reader, loop, stop, feedback, calls)
            finally:
                run.crew_seconds += time.perf_counter() - asked
                run.tool_sql_seconds += reader.sql_seconds - sql_before
                run.questions = question
            try:
                return check(parse_answer(answer), run.ledger, reader.scope)
            except ReportInvalid as exc:
                feedback = str(exc)
        raise PermanentFailure(
            f"the model's report failed validation {self.report_attempts} times; last problem: {feedback}"
        )

    def _result(
        self,
        scope: Scope,
        report: RenderedReport,
        run: _Run,
        reader: FigureReader,
        actions: list[dict[str, Any]],
        wall: float,
    ) -> dict[str, Any]:
        ledger = run.ledger
        model_seconds = getattr(run.llm, "model_seconds", None)
        return plain(
            {
                "period": {"start": scope.period_start, "end": scope.period_end},
                "contract_ids": list(scope.contract_ids) if scope.contract_ids is not None else None,
                "narrative": report.narrative,
                "figures": list(ledger.contracts.values()),
                "totals": list(ledger.totals.values()),
                "anomalies": ledger.anomalies,
                "citations": [c.as_dict() for c in report.citations],
                "actions": [
                    {k: a[k] for k in ("id", "type", "contract_id", "title", "reason", "payload")}
                    for a in actions
                ],
                "model": self.model_name,
                "questions": run.questions,
                "tool_calls": [
                    {"tool": t, "arguments": _visible_arguments(args, ledger), "rows": n}
                    for t, args, n in ledger.called
                ],
                "timings_ms": {
                    "wall": round(wall * 1000, 1),
                    "sql": round(reader.sql_seconds * 1000, 1),
                    "agent": round((run.crew_seconds - run.tool_sql_seconds) * 1000, 1),
                    "model": None if model_seconds is None else round(model_seconds * 1000, 1),
                },
            }
        )

    def _usage(self, run: _Run) -> dict[str, Any]:
        usage: dict[str, Any] = {"model": self.model_name, "questions": run.questions}
        if run.llm is not None:
            summary = run.llm.get_token_usage_summary()
            usage.update(
                prompt_tokens=summary.prompt_tokens,
                completion_tokens=summary.completion_tokens,
                total_tokens=summary.total_tokens,
                requests=summary.successful_requests,
            )
            if self.model_name == "offline":
                usage["estimated"] = True  # characters / 4: no tokenizer offline
        return usage
