"""A fake Groq server, so the Groq model path runs over real HTTP without a network.

It speaks what the official `groq` SDK speaks: `POST /openai/v1/chat/completions`
(the SDK appends that path to `base_url`), Groq-shaped completions and
Groq-shaped errors (`{"error": {"message", "type", "code"}}`).  Tests script
it: replies queued with `push()` are used first, in order; after that every
request goes to `fallback`, by default `cfo_brain`, a stand-in model that
drives the CFO tool-calling conversation by reading the tool results in the
messages.  Every request (headers and JSON body) and every reply is recorded
for assertions, and `served` counts the answers by status.

With `limits` set (`FakeLimits`), it enforces requests and tokens per window
as Groq does: token buckets refilled continuously, a request's tokens being
its prompt (its JSON at 4 characters a token, which is what the usage it
reports says) plus the completion it is about to return; every answer carries
Groq's `x-ratelimit-*` headers (`limit-requests` is the day's requests,
`limit-tokens` the window's tokens; RPM is enforced but, as with Groq, never
reported), and a request past a limit gets a 429 with `retry-after`.  The
window is a parameter, so a test compresses a minute into seconds.

uvicorn runs in a thread of its own, not on the test's event loop: the SDK is
synchronous and is called from the agent's worker thread while the test's
loop runs the Worker, so the server must not depend on either of them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

COMPLETIONS_PATH = "/openai/v1/chat/completions"
FIRST_TOOLS = ("contract_figures", "currency_totals", "worklog_anomalies")


@dataclass
class Reply:
    """One HTTP answer of the fake server."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a slow Groq, for client timeouts)


@dataclass
class Recorded:
    """One request the fake server received, and what it answered."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]
    reply: Reply | None = None
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])


# A scripted step: a fixed reply, or a function of the request body.
Step = Reply | Callable[[dict[str, Any]], Reply]

_ids = itertools.count(1)


# -- Groq-shaped bodies -----------------------------------------------------------


def tool_call(
    name: str, arguments: str | dict[str, Any] = "{}", call_id: str | None = None
) -> dict[str, Any]:
    """A tool call as Groq returns it: `arguments` is a JSON *string* (or whatever text the model wrote)."""
    return {
        "id": call_id or f"call_{next(_ids)}",
        "type": "function",
        "function": {
            "name": name,
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def completion(
    content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    *,
    model: str = "llama-3.3-70b-versatile",
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
) -> Reply:
    """A 200 chat completion: text, or tool calls (finish_reason "tool_calls")."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    n = next(_ids)
    return Reply(
        200,
        {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": {
                "queue_time": 0.01,
                "prompt_tokens": prompt_tokens,
                "prompt_time": 0.01,
                "completion_tokens": completion_tokens,
                "completion_time": 0.02,
                "total_tokens": prompt_tokens + completion_tokens,
                "total_time": 0.03,
            },
            "system_fingerprint": "fp_fake",
            "x_groq": {"id": f"req_fake_{n}"},
        },
    )


def error(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None, **headers: str
) -> Reply:
    """A Groq error body; header names given with underscores (retry_after -> retry-after)."""
    return Reply(
        status,
        {"error": {"message": message, "type": type, "code": code}},
        {k.replace("_", "-"): v for k, v in headers.items()},
    )


def rate_limited(**headers: str) -> Reply:
    """Groq's 429; headers as keywords (`retry_after="7"`, `retry_after_ms="1500"`), none by default."""
    return error(
        429,
        "Rate limit reached for model `llama-3.3-70b-versatile` on tokens per minute (TPM): "
        "Limit 6000, Used 5900, Requested 800. Please try again in 7s.",
        type="tokens",
        code="rate_limit_exceeded",
        **headers,
    )


def server_error() -> Reply:
    return error(500, "Internal Server Error", type="internal_server_error")


def tool_use_failed() -> Reply:
    reply = error(
        400,
        "Failed to call a function. Please adjust your prompt. See 'failed_generation' for more details.",
        code="tool_use_failed",
    )
    reply.body["error"]["failed_generation"] = '<function=contract_figures{"a": }</function>'
    return reply


def invalid_key() -> Reply:
    return error(401, "Invalid API Key", code="invalid_api_key")


# -- reading the conversation --------------------------------------------------------


def tool_results(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Latest JSON object each tool returned, by tool name.

    Text results (worklog_notes' tagged data, CrewAI's "Error: ..." when a
    call could not run) are left out, so a model reading this asks again.
    """
    names = {
        call["id"]: call["function"]["name"]
        for m in messages
        if m.get("role") == "assistant"
        for call in m.get("tool_calls") or []
    }
    seen: dict[str, Any] = {}
    for m in messages:
        if m.get("role") != "tool":
            continue
        try:
            result = json.loads(m.get("content") or "")
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            seen[names.get(m.get("tool_call_id"), "?")] = result
    return seen


def cfo_report(seen: dict[str, Any], *, wrong_by: float = 0.0) -> dict[str, Any]:
    """A report that cites figures by reference, as the prompt asks (or, with `wrong_by`, writes
    the first one itself as a numeral, off by that much: the check must refuse it).

    One send_invoice action for the contract with the most unbilled value.
    """
    contracts = seen["contract_figures"]["contracts"]
    totals = seen["currency_totals"]["totals"]

    def ref(name: str) -> str:
        return "{" + name + "}"

    sentences = [
        f"{ref(f'contract:{c}.title')} logged {ref(f'contract:{c}.hours_logged')} hours, with "
        f"{ref(f'contract:{c}.unbilled_value')} {ref(f'contract:{c}.currency')} unbilled."
        for c in (row["contract_id"] for row in contracts)
    ]
    sentences += [
        f"Billable in {ref(f'total:{t}.currency')}: {ref(f'total:{t}.billable_value')}."
        for t in (row["currency"] for row in totals)
    ]
    narrative = "Unbilled work is the main lever this quarter. " + " ".join(sentences)
    if wrong_by and contracts:
        first = contracts[0]
        written = f"{(first['hours_logged'] or 0) + wrong_by:g}"
        narrative = narrative.replace(ref(f"contract:{first['contract_id']}.hours_logged"), written, 1)
    unbilled = [c for c in contracts if (c["unbilled_value"] or 0) > 0]
    actions = []
    if unbilled:
        top = max(unbilled, key=lambda c: c["unbilled_value"])
        actions.append(
            {
                "type": "send_invoice",
                "contract_id": top["contract_id"],
                "title": "Invoice " + ref(f"contract:{top['contract_id']}.client_name"),
                "reason": "Billable work in the period is not invoiced yet.",
            }
        )
    return {"narrative": narrative, "actions": actions}


def cfo_brain(body: dict[str, Any], *, wrong_by: float = 0.0) -> Reply:
    """A well-behaved model: call the three figure tools (all at once), then answer with a report."""
    messages = body.get("messages") or []
    seen = tool_results(messages)
    offered = {t["function"]["name"] for t in body.get("tools") or []}
    wanted = [name for name in FIRST_TOOLS if name in offered and name not in seen]
    asked = sum(1 for m in messages if m.get("role") == "assistant")
    if wanted:
        return completion(tool_calls=[tool_call(name) for name in wanted], prompt_tokens=300 + asked)
    if not all(name in seen for name in FIRST_TOOLS):
        return completion("I could not read the figures.")
    report = cfo_report(seen, wrong_by=wrong_by)
    return completion(json.dumps(report), prompt_tokens=900 + asked, completion_tokens=250)


# -- rate limits, as Groq enforces and reports them ---------------------------------------


@dataclass
class FakeLimits:
    """What the fake organisation may spend per `window` seconds (and per day: 1440 windows)."""

    rpm: int
    tpm: int
    rpd: int = 14_400
    window: float = 60.0


class _Bucket:
    def __init__(self, limit: int, period: float) -> None:
        self.limit, self.period = limit, period
        self.level = float(limit)
        self.at = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.at) * self.limit / self.period)
        self.at = now

    def wait(self, cost: float) -> float:
        cost = min(cost, self.limit)
        return 0.0 if self.level >= cost else (cost - self.level) * self.period / self.limit

    def until_full(self) -> float:
        return (self.limit - self.level) * self.period / self.limit


def groq_duration(seconds: float) -> str:
    """Seconds as Groq writes its resets: "7.66s", "2m59.56s"."""
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes)}m{rest:.2f}s" if minutes else f"{rest:.2f}s"


def prompt_tokens_of(body: dict[str, Any]) -> int:
    return (len(json.dumps(body.get("messages") or [])) + len(json.dumps(body.get("tools") or []))) // 4


class _Limiter:
    def __init__(self, limits: FakeLimits) -> None:
        self.limits = limits
        self.requests = _Bucket(limits.rpm, limits.window)
        self.tokens = _Bucket(limits.tpm, limits.window)
        self.day = _Bucket(limits.rpd, limits.window * 1440)

    def admit(self, tokens: int) -> tuple[float, dict[str, str]]:
        """(0, headers) and the request is counted, or (seconds to wait, headers) and it is not."""
        now = time.monotonic()
        for bucket in (self.requests, self.tokens, self.day):
            bucket.refill(now)
        wait = max(self.requests.wait(1), self.tokens.wait(tokens), self.day.wait(1))
        if wait == 0:
            self.requests.level -= 1
            self.tokens.level -= tokens
            self.day.level -= 1
        headers = {
            "x-ratelimit-limit-requests": str(self.limits.rpd),
            "x-ratelimit-limit-tokens": str(self.limits.tpm),
            "x-ratelimit-remaining-requests": str(max(0, int(self.day.level))),
            "x-ratelimit-remaining-tokens": str(max(0, int(self.tokens.level))),
            "x-ratelimit-reset-requests": groq_duration(self.day.until_full()),
            "x-ratelimit-reset-tokens": groq_duration(self.tokens.until_full()),
        }
        if wait:
            headers["retry-after"] = f"{wait:.3f}"
        return wait, headers


# -- the server ------------------------------------------------------------------------


class FakeGroq:
    """The scripted server; `url` is what to give the SDK as `base_url`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script_errors: list[str] = []  # tracebacks of scripted steps that raised
        self.fallback: Callable[[dict[str, Any]], Reply] = cfo_brain
        self.served: collections.Counter[int] = collections.Counter()  # answers by status
        self._limiter: _Limiter | None = None
        self._script: deque[Step] = deque()
        self._lock = threading.Lock()
        self.url = ""
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    def limit(self, limits: FakeLimits) -> None:
        """Enforce and report these limits from now on (see the module docstring)."""
        self._limiter = _Limiter(limits)

    def push(self, *steps: Step) -> None:
        """Queue replies (or functions of the request body) for the next requests, in order."""
        with self._lock:
            self._script.extend(steps)

    @property
    def completions(self) -> list[Recorded]:
        """The requests that got a 200."""
        return [r for r in self.requests if r.reply is not None and r.reply.status == 200]

    def usage_total(self, key: str) -> int:
        return sum(int(r.reply.body["usage"][key]) for r in self.completions if r.reply is not None)

    async def _handle(self, request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        record = Recorded(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        with self._lock:
            self.requests.append(record)
            step: Step = self._script.popleft() if self._script else self.fallback
        if request.url.path != COMPLETIONS_PATH:
            reply = error(
                404, f"Unknown request URL: {request.method} {request.url.path}", code="unknown_url"
            )
        elif isinstance(step, Reply):
            reply = step
        else:
            try:
                reply = step(body)
            except Exception as exc:  # a bug in the test's script, not a Groq behaviour: keep it loud
                self.script_errors.append(traceback.format_exc())
                reply = error(500, f"the fake server's script raised {exc!r}", type="fake_script_error")
        if self._limiter is not None and request.url.path == COMPLETIONS_PATH:
            reply = self._limited(body, reply)
        record.reply = reply
        if reply.delay:
            await asyncio.sleep(reply.delay)
        with self._lock:
            self.served[reply.status] += 1  # sent: a reply held until the client is gone is not
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


    def _limited(self, body: dict[str, Any], reply: Reply) -> Reply:
        """The reply as a rate-limited Groq sends it: usage from the request's size, limits enforced."""
        assert self._limiter is not None
        tokens = prompt_tokens_of(body)
        if reply.status == 200:
            usage = dict(reply.body["usage"], prompt_tokens=tokens)
            usage["total_tokens"] = tokens + int(usage["completion_tokens"])
            reply = Reply(200, {**reply.body, "usage": usage}, dict(reply.headers), reply.delay)
            tokens = usage["total_tokens"]
        with self._lock:
            wait, headers = self._limiter.admit(tokens)
        if wait:
            limited = rate_limited(retry_after=headers.pop("retry-after"))
            limited.headers.update(headers)
            return limited
        return Reply(reply.status, reply.body, {**reply.headers, **headers}, reply.delay)


@contextmanager
def running_fake_groq() -> Iterator[FakeGroq]:
    """Serve a FakeGroq on 127.0.0.1 (a free port) in a background thread, for the `with` block."""
    fake = FakeGroq()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A short graceful shutdown: a reply still held back by `delay` is cancelled, not waited out.
    config = uvicorn.Config(
        fake.app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-groq", daemon=True)
    thread.start()
    try:
        # Readiness is an event, not a timing assumption: wait for uvicorn to say it is serving.
        for _ in range(2000):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.005)
        if not server.started:
            raise RuntimeError("the fake Groq server did not start")
        fake.url = f"http://127.0.0.1:{port}"
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
