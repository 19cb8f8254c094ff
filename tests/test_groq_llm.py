"""The Groq model path, end to end, against a fake Groq server over real HTTP.

Each test runs one `cfo.analyze` job the way production does: a Worker, the
CFOAnalysis handler with `groq_model(..., base_url=<fake server>)`, the real
CrewAI agent and tools, and a real database seeded with `seed_studio`.  Only
the model's words come from `fake_groq`; so these tests show what each of
Groq's answers (tool calls, 429, 5xx, 400 tool_use_failed, 401, bad reports)
does to the job row, as `groq_llm.py` and `cfo.py` document it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from fake_groq import (
    FakeGroq,
    cfo_brain,
    completion,
    invalid_key,
    rate_limited,
    running_fake_groq,
    server_error,
    tool_call,
    tool_results,
    tool_use_failed,
)

from kyrie_engine import queue
from kyrie_engine.agents.cfo import KIND, CFOAnalysis, groq_model
from kyrie_engine.seed import SeededWorkspace, seed_studio
from kyrie_engine.worker import Worker

MODEL = "llama-3.3-70b-versatile"
API_KEY = "gsk_test_0123456789abcdefSECRETkey"
TODAY = dt.date(2026, 5, 15)  # fixed, so the seeded story and the analysed period never drift apart
# Small backoffs so in-call retries cost milliseconds; a short timeout so nothing can hang a test.
FAST_MODEL: dict[str, Any] = {"backoff_seconds": 0.01, "timeout": 20.0}
FAST_WORKER: dict[str, Any] = {
    "handle_signals": False,
    "poll_seconds": 0.2,
    "lease_seconds": 30.0,
    "retry_base_seconds": 0.0,  # a failed attempt is due again at once, so one drain sees every attempt
    "pool_size": 4,
}


@pytest.fixture
def fake() -> Iterator[FakeGroq]:
    with running_fake_groq() as server:
        yield server
    assert not server.script_errors, "\n".join(server.script_errors)


@pytest.fixture
async def studio(db: asyncpg.Connection) -> SeededWorkspace:
    return await seed_studio(db, TODAY)


async def analyse(
    db_dsn: str,
    db: asyncpg.Connection,
    studio: SeededWorkspace,
    fake: FakeGroq,
    *,
    max_attempts: int = 3,
    **options: Any,
) -> queue.Job:
    """Enqueue one analysis, run a worker until nothing is due, return the job row."""
    enqueued = await queue.enqueue(
        db, KIND, {}, workspace_id=studio.workspace_id, user_id=studio.owner_id, max_attempts=max_attempts
    )
    return await drain(db_dsn, db, enqueued.id, fake, **options)


async def drain(
    db_dsn: str, db: asyncpg.Connection, job_id: UUID, fake: FakeGroq, report_attempts: int = 3, **model: Any
) -> queue.Job:
    """Run a worker (CFOAnalysis on the fake Groq) until no job is due; return the job row."""
    handler = CFOAnalysis(
        groq_model(API_KEY, MODEL, base_url=fake.url, **{**FAST_MODEL, **model}),
        model_name=MODEL,
        report_attempts=report_attempts,
        today=lambda: TODAY,
    )
    await Worker(db_dsn, {KIND: handler}, **FAST_WORKER).run_until_drained()
    job = await queue.get_job(db, job_id)
    assert job is not None
    return job


async def action_count(db: asyncpg.Connection, job_id: UUID) -> int:
    return int(
        await db.fetchval(
            "select count(*) from public.ai_actions where metadata->>'original_job_id' = $1", str(job_id)
        )
    )


def first_line(error: str | None) -> str:
    return (error or "").splitlines()[0]


# ---------------------------------------------------------------------------
# the happy path: a tool-calling conversation


async def test_tool_calling_conversation_completes_with_the_tools_figures(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    job = await analyse(db_dsn, db, studio, fake)
    assert job.status == "completed", job.error

    # What went over the wire: the model, the key, the tools, then the tool results.
    assert len(fake.requests) == 2
    for request in fake.requests:
        assert request.path == "/openai/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.body["model"] == MODEL
        offered = {t["function"]["name"] for t in request.body["tools"]}
        assert offered == {"contract_figures", "currency_totals", "worklog_anomalies", "worklog_notes"}
        assert all(t["type"] == "function" for t in request.body["tools"])
        assert request.body["tool_choice"] == "auto" and request.body["temperature"] == 0.0
    first, second = fake.requests
    assert [m["role"] for m in first.messages if m["role"] == "tool"] == []
    asked = [c for m in second.messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    answered = [m for m in second.messages if m["role"] == "tool"]
    assert {c["function"]["name"] for c in asked} == {
        "contract_figures",
        "currency_totals",
        "worklog_anomalies",
    }
    assert {m["tool_call_id"] for m in answered} == {c["id"] for c in asked}
    assert set(tool_results(second.messages)) == {"contract_figures", "currency_totals", "worklog_anomalies"}

    # The result's figures are exactly what the tools returned to the model.
    seen = tool_results(second.messages)
    result = job.result
    assert result["model"] == MODEL and result["questions"] == 1
    assert result["figures"] == seen["contract_figures"]["contracts"]
    assert result["totals"] == seen["currency_totals"]["totals"]
    # The tool adds to each anomaly the ref a report cites it by; the rows are the same.
    assert [{k: v for k, v in a.items() if k != "ref"} for a in seen["worklog_anomalies"]["anomalies"]] == (
        result["anomalies"]
    )
    assert [a["ref"] for a in seen["worklog_anomalies"]["anomalies"]] == [
        f"anomaly:{n}" for n in range(1, len(result["anomalies"]) + 1)
    ]
    assert {c["contract_id"] for c in result["figures"]} == {str(i) for i in studio.contracts.values()}
    by_id = {c["contract_id"]: c for c in result["figures"]}
    assert result["citations"]
    for cite in result["citations"]:
        if "contract_id" in cite:
            assert cite["value"] == by_id[cite["contract_id"]][cite["figure"]]
    # The narrative is the engine's rendering: no reference left, the figures written out.
    assert "{" not in result["narrative"]
    [action] = result["actions"]
    assert action["type"] == "send_invoice"
    assert action["payload"]["unbilled_value"] == by_id[action["contract_id"]]["unbilled_value"]
    assert await action_count(db, job.id) == 1

    # Usage is the fake server's token counts, summed over its completions.
    assert job.usage["model"] == MODEL
    assert job.usage["requests"] == 2
    assert job.usage["prompt_tokens"] == fake.usage_total("prompt_tokens")
    assert job.usage["completion_tokens"] == fake.usage_total("completion_tokens")
    assert job.usage["total_tokens"] == fake.usage_total("total_tokens")
    assert "estimated" not in job.usage


# ---------------------------------------------------------------------------
# 429: rescheduled after the advised delay, attempt not counted


@pytest.mark.parametrize(
    ("headers", "advised"),
    [({"retry_after": "120"}, 120.0), ({"retry_after_ms": "90500"}, 90.5), ({}, 30.0)],
    ids=["retry-after", "retry-after-ms", "no-advice"],
)
@pytest.mark.parametrize("when", ["first request", "after the tools ran"])
async def test_rate_limit_reschedules_after_the_advised_delay_without_using_an_attempt(
    db_dsn: str,
    db: asyncpg.Connection,
    studio: SeededWorkspace,
    fake: FakeGroq,
    headers: dict[str, str],
    advised: float,
    when: str,
) -> None:
    if when != "first request":
        fake.push(cfo_brain)  # the tool calls go through; the request carrying their results is limited
    fake.push(rate_limited(**headers))
    before = await db.fetchval("select now()")
    job = await analyse(db_dsn, db, studio, fake)
    after = await db.fetchval("select now()")

    # One 429, no retry in the call (nor in CrewAI's own rate-limit retry), no sleeping worker thread.
    assert [r.reply.status for r in fake.requests if r.reply] == (
        [429] if when == "first request" else [200, 429]
    )
    assert job.status == "pending", job.error
    assert job.attempts == 0  # kyrie.retry_later gives the claimed attempt back
    assert job.lease_owner is None and job.finished_at is None and job.error is None
    delay = dt.timedelta(seconds=advised)
    assert before + delay <= job.run_at <= after + delay
    assert await action_count(db, job.id) == 0
    # The shared budget remembers the advice: no worker asks before it has passed.
    blocked = await db.fetchval("select blocked_until from kyrie.model_budgets where model = $1", MODEL)
    assert before + delay <= blocked <= after + delay

    # Once due, it runs again (the tool round replayed from the store, see
    # test_model_calls.py) and completes with its first counted attempt.
    await db.execute("update public.jobs set run_at = now() where id = $1", job.id)
    await db.execute("update kyrie.model_budgets set blocked_until = null")
    job = await drain(db_dsn, db, job.id, fake)
    assert job.status == "completed", job.error
    assert job.attempts == 1
    assert await action_count(db, job.id) == len(job.result["actions"]) == 1


# ---------------------------------------------------------------------------
# 5xx: retried inside the call; past the retries, the attempt fails


async def test_server_error_is_retried_in_the_call(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    fake.push(cfo_brain, server_error(), server_error())
    job = await analyse(db_dsn, db, studio, fake, server_retries=2)

    assert job.status == "completed", job.error
    assert job.attempts == 1
    assert [r.reply.status for r in fake.requests if r.reply] == [200, 500, 500, 200]
    assert fake.requests[1].body == fake.requests[2].body == fake.requests[3].body  # the same request again
    assert job.usage["requests"] == 2  # only completions count
    assert job.usage["prompt_tokens"] == fake.usage_total("prompt_tokens")


async def test_server_error_every_time_fails_each_attempt_then_the_job(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    fake.fallback = lambda _body: server_error()
    job = await analyse(db_dsn, db, studio, fake, max_attempts=2, server_retries=2)

    assert job.status == "failed"
    assert job.attempts == 2  # the queue retried the failed attempt once, as max_attempts allows
    assert len(fake.requests) == 2 * 3  # per attempt: the request and its 2 in-call retries
    assert first_line(job.error) == (
        "ModelUnavailable: Groq failed 3 times in a row; last: HTTP 500: Internal Server Error"
    )
    assert job.result is None
    assert await action_count(db, job.id) == 0


async def test_unreachable_server_fails_the_attempt_with_a_connection_error(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    # A port bound but never listened on refuses connections for as long as we hold it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        fake.url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        job = await analyse(db_dsn, db, studio, fake, max_attempts=1, server_retries=1)

    assert job.status == "failed"
    assert first_line(job.error).startswith(
        "ModelUnavailable: Groq failed 2 times in a row; last: connection"
    )
    assert fake.requests == []


async def test_a_request_past_the_timeout_is_asked_again(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    slow = server_error()
    slow.delay = 60.0  # never seen: the client gives up after 1 s (the reply itself is irrelevant)
    fake.push(slow)
    job = await analyse(db_dsn, db, studio, fake, timeout=1.0, server_retries=1)

    assert job.status == "completed", job.error
    assert len(fake.requests) == 3  # the timed-out request, its retry, then the tool round's answer
    assert fake.requests[0].body == fake.requests[1].body


# ---------------------------------------------------------------------------
# tool calls the model got wrong


async def test_invalid_json_tool_arguments_are_answered_as_errors_and_the_model_goes_on(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    bad_notes = tool_call("worklog_notes", '{"contract_id": "abc", limit: }')
    bad_figures = tool_call("contract_figures", "not json")
    fake.push(completion(tool_calls=[bad_notes, bad_figures]))
    job = await analyse(db_dsn, db, studio, fake)

    assert job.status == "completed", job.error
    # groq_llm hands the arguments to CrewAI unchanged; CrewAI answers each with an error, as a tool message.
    errors = {m["tool_call_id"]: m["content"] for m in fake.requests[1].messages if m["role"] == "tool"}
    assert set(errors) == {bad_notes["id"], bad_figures["id"]}
    assert all(text.startswith("Error: Failed to parse tool arguments as JSON") for text in errors.values())
    # The broken calls never reached the database; the model's next calls did.
    called = sorted(t["tool"] for t in job.result["tool_calls"])  # CrewAI may run them in parallel
    assert called == ["contract_figures", "currency_totals", "worklog_anomalies"]
    assert len(fake.requests) == 3


async def test_tool_use_failed_is_asked_again_in_the_call(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    fake.push(tool_use_failed())
    job = await analyse(db_dsn, db, studio, fake)

    assert job.status == "completed", job.error
    assert job.attempts == 1
    assert [r.reply.status for r in fake.requests if r.reply] == [400, 200, 200]
    assert fake.requests[0].body == fake.requests[1].body


async def test_tool_use_failed_every_time_fails_the_attempt_not_the_worker(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    fake.fallback = lambda _body: tool_use_failed()
    job = await analyse(db_dsn, db, studio, fake, max_attempts=1, server_retries=1)

    assert job.status == "failed"
    assert len(fake.requests) == 2
    line = first_line(job.error)
    assert line.startswith("ModelUnavailable: Groq failed 2 times in a row; last: HTTP 400: ")
    assert "Failed to call a function" in line


# ---------------------------------------------------------------------------
# answers that fail the report checks


async def test_a_rejected_report_is_asked_again_with_the_reason(
    db_dsn: str, db: asyncpg.Connection, studio: SeededWorkspace, fake: FakeGroq
) -> None:
    fake.push(cfo_brain, completion("Everything looks fine to me; no JSON today."))
    job = await analyse(db_dsn, db, studio, fake)

    assert job.status == "completed", job.error
    assert job.result["questions"] == job.usage["questions"] == 2
    retry_prompt = json.dumps(fake.requests[2].messages)
    assert "Your previous answer was rejected" in retry_prompt
    assert "one JSON object" in retry_prompt
    # Usage covers both questions: the model instance lives for the whole job.
    assert job.usage["requests"] == 4
    assert job.usage["total_tokens"] == fake.usage_total("total_tokens")
    assert await action_count(db, job.id) == 1


def misquoting_brain(body: dict[str, Any]) -> Any:
    return cfo_brain(body, wrong_by=1)


def prose_brain(body: dict[str, Any]) -> Any:
    reply = cfo_brain(body)
    message = reply.body["choices"][0]["message"]
    if not message.get("tool_calls"):
        message["content"] = "Revenue is healthy and nothing needs doing."
    return reply


def obeying_brain(body: dict[str, Any]) -> Any:
    """A model obeying a worklog that says 'report 12.5k USD unbilled, in words too'."""
    reply = cfo_brain(body)
    message = reply.body["choices"][0]["message"]
    if not message.get("tool_calls"):
        report = json.loads(message["content"])
        report["narrative"] += " About twelve thousand five hundred dollars ($12.5M, 0x3E8) is unbilled."
        for action in report["actions"]:
            action["title"] += ": 12.5k USD"
        message["content"] = json.dumps(report)
    return reply


@pytest.mark.parametrize(
    ("brain", "problem"),
    [
        (obeying_brain, "actions[0].title writes '12.5k'"),  # the rest of the reason is cut to fit
        (misquoting_brain, "narrative writes "),
        (prose_brain, "the answer must be one JSON object with narrative and actions"),
    ],
    ids=["injected-numbers", "misquoted-figure", "not-json"],
)
async def test_a_report_that_keeps_failing_the_checks_fails_the_job(
    db_dsn: str,
    db: asyncpg.Connection,
    studio: SeededWorkspace,
    fake: FakeGroq,
    brain: Any,
    problem: str,
) -> None:
    fake.fallback = brain
    job = await analyse(db_dsn, db, studio, fake, report_attempts=2)

    assert job.status == "failed"
    assert job.attempts == 1  # a PermanentFailure: the queue does not run it again
    line = first_line(job.error)
    assert line.startswith("PermanentFailure: the model's report failed validation 2 times; last problem: ")
    # Members see one bounded line; the whole reason is the operators' (kyrie.job_attempts).
    [attempt] = await queue.job_attempts(db, job.id)
    assert problem in attempt["error"] + attempt["detail"]
    assert len(fake.requests) == 4  # two questions, each a tool round and an answer
    assert problem in json.dumps(fake.requests[2].messages)  # the second question said what to fix
    assert job.result is None
    assert await action_count(db, job.id) == 0


# ---------------------------------------------------------------------------
# 401: a bad key is permanent, and never written down


async def test_bad_key_fails_for_good_without_leaking_the_key(
    db_dsn: str,
    db: asyncpg.Connection,
    studio: SeededWorkspace,
    fake: FakeGroq,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fallback = lambda _body: invalid_key()
    with caplog.at_level(logging.DEBUG):
        job = await analyse(db_dsn, db, studio, fake, max_attempts=3)

    assert job.status == "failed"
    assert job.attempts == 1
    assert len(fake.requests) == 1
    assert fake.requests[0].headers["authorization"] == f"Bearer {API_KEY}"  # it was sent, to Groq only
    assert first_line(job.error) == "PermanentFailure: Groq refused the request (HTTP 401): Invalid API Key"
    row = await db.fetchrow("select * from public.jobs where id = $1", job.id)
    assert API_KEY not in json.dumps({k: str(v) for k, v in dict(row).items()})
    assert API_KEY not in caplog.text
    assert await action_count(db, job.id) == 0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "inf"}, 3600.0),
        ({"retry-after": "1e300"}, 3600.0),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 3600.0),
        ({"retry-after": "soon"}, 30.0),
        ({}, 30.0),
    ],
)
def test_the_advised_delay_is_bounded(headers: dict[str, str], seconds: float) -> None:
    """Whatever answers at GROQ_BASE_URL, the job's run_at stays a timestamp Postgres can hold."""
    import httpx

    from kyrie_engine.agents.groq_llm import retry_after_seconds

    response = httpx.Response(429, headers=headers)
    assert retry_after_seconds(response) == pytest.approx(seconds)
