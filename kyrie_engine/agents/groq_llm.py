"""A CrewAI model backed by the official `groq` SDK (OpenAI-compatible chat completions).

CrewAI's contract for a custom model (`crewai.llms.base_llm.BaseLLM.call`):
with `tools` given and `available_functions` None (the native tool-calling
path of `AgentExecutor`), return the provider's tool calls as a list and let
CrewAI run them and send back `role: "tool"` messages; otherwise return the
text.  `supports_function_calling()` True is what makes CrewAI take that path
instead of its ReAct text protocol.

Failures are sorted here, because each needs a different fate:
- 5xx, timeouts, lost connections, and Groq's `tool_use_failed` (the model
  produced a tool call its server could not parse): retried in the call,
  with backoff, `server_retries` times; then `ModelUnavailable` (the job's
  attempt fails and the queue retries it later).
- 429: `ModelRateLimited(retry_after)` at once, which the handler turns into
  `RetryLater` so the job is rescheduled after the advised delay without
  burning an attempt (and no worker thread sleeps through it).  The SDK's own
  retries are off (`max_retries=0`): they would retry 429s by sleeping.
- other 4xx (bad key, unknown model): `ModelRefused`, a permanent failure.

Token usage is added up on the instance (`get_token_usage_summary()`), and
the handler records it on the job.

Bound to a job (`bind_calls`, see `replay.py`), every request is first
looked up in the job's stored calls (an answered one is replayed, not sent),
then takes its estimated tokens and one request from the shared budget (see
`budget.py`: a short wait is slept here, a long one is `ModelRateLimited`),
and its response is stored, its tokens counted and the budget corrected from
the real usage and Groq's `x-ratelimit-*` headers (the SDK's raw response).
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import threading
import time
from typing import Any

import groq
import httpx
from crewai.llms.base_llm import BaseLLM
from groq.types.chat import ChatCompletion
from pydantic import PrivateAttr

from kyrie_engine.agents.budget import RateHeaders
from kyrie_engine.agents.errors import AnalysisStopped, ModelRateLimited, ModelRefused, ModelUnavailable
from kyrie_engine.agents.replay import JobModelCalls, estimate_tokens, request_hash

DEFAULT_MODEL = "llama-3.3-70b-versatile"
# Groq's context window for llama-3.3-70b-versatile; CrewAI compacts the
# conversation when a request would pass 85% of what this returns.
CONTEXT_WINDOW = 131_072
DEFAULT_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(response: httpx.Response | None) -> float:
    """Groq's advice: `retry-after-ms`, `retry-after` (seconds or an HTTP date), else a default.

    Bounded to [0, MAX_RETRY_AFTER]: whatever answers at GROQ_BASE_URL (a
    proxy, a look-alike API) may send `inf` or a date in the year 9999, and
    the job's run_at must stay a timestamp the database can hold."""
    headers = response.headers if response is not None else httpx.Headers()
    advised = DEFAULT_RETRY_AFTER
    try:
        if "retry-after-ms" in headers:
            advised = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            value = headers["retry-after"]
            try:
                advised = float(value)
            except ValueError:
                advised = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        advised = DEFAULT_RETRY_AFTER
    if not math.isfinite(advised):
        advised = MAX_RETRY_AFTER
    return min(max(0.0, advised), MAX_RETRY_AFTER)


def _wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CrewAI's messages as the chat-completions API takes them (only the keys it knows)."""
    wire = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content blocks: keep the text
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out: dict[str, Any] = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and m.get("tool_calls"):
            out["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                }
                for c in m["tool_calls"]
            ]
        if m["role"] == "tool":
            out["tool_call_id"] = m["tool_call_id"]
            out["content"] = "" if content is None else str(content)
        wire.append(out)
    return wire


class GroqLLM(BaseLLM):
    """Groq chat completions for CrewAI; see the module docstring for the failure rules."""

    llm_type: str = "groq"
    provider: str = "groq"
    timeout: float = 60.0
    server_retries: int = 2
    backoff_seconds: float = 1.0
    max_completion_tokens: int = 4096
    # The output tokens a request is assumed to spend until its usage is known
    # (its whole max_completion_tokens would hold most of the minute's budget back).
    completion_share: int = 512

    _client: groq.Groq | None = PrivateAttr(default=None)
    _calls: JobModelCalls | None = PrivateAttr(default=None)
    _seq: int = PrivateAttr(default=0)
    _stop: threading.Event | None = PrivateAttr(default=None)
    _model_seconds: float = PrivateAttr(default=0.0)

    def bind_stop(self, stop: threading.Event) -> None:
        self._stop = stop

    def bind_calls(self, calls: JobModelCalls) -> None:
        """Replay, store and pace this job's requests (see the module docstring)."""
        self._calls = calls
        self._seq = 0

    @property
    def model_seconds(self) -> float:
        """Time spent waiting for Groq (retries and backoff included)."""
        return self._model_seconds

    def _groq(self) -> groq.Groq:
        if self._client is None:
            self._client = groq.Groq(
                api_key=self.api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
            )
        return self._client

    # -- what CrewAI asks of a model ------------------------------------------

    def supports_function_calling(self) -> bool:
        return True

    def supports_stop_words(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return int(CONTEXT_WINDOW * 0.85)

    def get_input_tokens_count(self, messages: Any, tools: Any = None, response_model: Any = None) -> int:
        text = (
            messages if isinstance(messages, str) else "".join(str(m.get("content") or "") for m in messages)
        )
        return (len(text) + 3) // 4

    def call(
        self,
        messages: Any,
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str | list[dict[str, Any]]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        params: dict[str, Any] = {
            "model": self.model,
            "messages": _wire_messages(messages),
            "temperature": 0.0 if self.temperature is None else self.temperature,
            "max_completion_tokens": self.max_completion_tokens,
        }
        if tools:
            params["tools"] = tools
            params["tool_choice"] = "auto"
        seq, self._seq = self._seq, self._seq + 1
        completion = None
        digest = request_hash(params)
        if self._calls is not None:
            stored = self._calls.replay(seq, digest)
            if stored is not None:
                completion = ChatCompletion.model_validate(stored)
        if completion is None:
            completion = self._complete(params, seq, digest)

        usage = completion.usage
        if usage is not None:
            self._track_token_usage_internal(
                {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens,
                }
            )
        message = completion.choices[0].message
        calls: list[dict[str, Any]] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls or []
        ]
        if calls and not available_functions:
            return calls
        if calls and available_functions:  # a caller that wants the tool run here (not the agent loop)
            first = calls[0]["function"]
            try:
                args = json.loads(first["arguments"] or "{}")
            except json.JSONDecodeError:
                args = {}
            result = self._handle_tool_execution(
                first["name"], args, available_functions, from_task, from_agent
            )
            if result is not None:
                return result
        return message.content or ""

    # -- one request, with the retries it deserves ------------------------------

    def _complete(self, params: dict[str, Any], seq: int, digest: bytes) -> ChatCompletion:
        calls = self._calls
        estimate = estimate_tokens(params, self.completion_share)
        tries = 0
        while True:
            if self._stop is not None and self._stop.is_set():
                raise AnalysisStopped("the job was cancelled or lost")
            tries += 1
            if calls is not None:
                calls.take(estimate)
            started = time.perf_counter()
            limited: float | None = None
            failure: str | None = None
            refused: str | None = None
            headers: httpx.Headers | None = None
            completion: ChatCompletion | None = None
            try:
                raw = self._groq().chat.completions.with_raw_response.create(**params)
                headers = raw.headers
                parsed = raw.parse()
                assert isinstance(parsed, ChatCompletion)  # streaming is off
                completion = parsed
            except groq.RateLimitError as exc:
                limited = retry_after_seconds(exc.response)
                headers = exc.response.headers
            except groq.APIStatusError as exc:
                headers = exc.response.headers
                if exc.status_code >= 500 or exc.status_code == 408 or _tool_use_failed(exc):
                    failure = f"HTTP {exc.status_code}: {_provider_message(exc, self.api_key)}"
                else:
                    refused = (
                        f"Groq refused the request (HTTP {exc.status_code}): "
                        f"{_provider_message(exc, self.api_key)}"
                    )
            except groq.APITimeoutError:
                failure = f"no answer within {self.timeout:g}s"
            except groq.APIConnectionError as exc:
                failure = f"connection failed ({exc.__cause__ or exc})"
            finally:
                self._model_seconds += time.perf_counter() - started
            if completion is not None:
                if calls is not None:
                    self._spent(calls, estimate, seq, digest, headers, completion)
                return completion
            if calls is not None:
                # A request that got no answer spent no tokens: give the estimate back, learn the headers.
                calls.settle(estimate, None, RateHeaders.of(headers))
                if limited is not None:
                    calls.rate_limited(limited)
            # Raised here, outside the except blocks, so that nothing is
            # chained to it that CrewAI's own rate-limit retry would recognise.
            if refused is not None:
                raise ModelRefused(refused)
            if limited is not None:
                raise ModelRateLimited(limited)
            if tries > self.server_retries:
                raise ModelUnavailable(f"Groq failed {tries} times in a row; last: {failure}")
            delay = self.backoff_seconds * 2 ** (tries - 1)
            time.sleep(delay / 2 + random.random() * delay / 2)  # noqa: S311 (jitter, not crypto)

    def _spent(
        self,
        calls: JobModelCalls,
        estimate: int,
        seq: int,
        digest: bytes,
        headers: httpx.Headers | None,
        completion: ChatCompletion,
    ) -> None:
        usage = completion.usage
        prompt = usage.prompt_tokens if usage is not None else 0
        output = usage.completion_tokens if usage is not None else 0
        calls.settle(estimate, prompt + output, RateHeaders.of(headers))
        calls.record(seq, digest, completion.model_dump(mode="json"), prompt, output)


def _provider_message(exc: groq.APIStatusError, api_key: str | None) -> str:
    """The provider's own words, for jobs.error.  Groq never echoes the key,
    but an OpenAI-compatible server at GROQ_BASE_URL might: mask it anyway."""
    body = exc.body
    text = str(exc.message)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
    if api_key:
        text = text.replace(api_key, "***")
    return text[:500]


def _tool_use_failed(exc: groq.APIStatusError) -> bool:
    """Groq answers 400 `tool_use_failed` when the model wrote a tool call it could not parse:
    a flaw of that one generation, so asking again is the cure."""
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    return exc.status_code == 400 and isinstance(error, dict) and error.get("code") == "tool_use_failed"
