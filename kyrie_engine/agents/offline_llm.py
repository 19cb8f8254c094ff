"""A deterministic CFO model: no network, same CrewAI loop as the real one.

It speaks CrewAI's native tool-calling contract exactly as a provider model
does (see `crewai.agents.agent_executor.AgentExecutor.call_llm_native_tools`):
`call(messages, tools=[OpenAI-style schemas])` returns either a list of tool
calls (`{"id", "type": "function", "function": {"name", "arguments"}}`),
which CrewAI executes and answers with `role: "tool"` messages, or a string,
the final answer.  So the demo, the tests and the benchmark run the real
agent, the real tools (SQL as the user) and the real report checks; only the
words come from rules instead of a network:

1. ask for contract_figures, currency_totals and worklog_anomalies at once;
2. read the worklog notes of the contracts it will flag for budget;
3. answer with a narrative and actions whose every figure, date and name
   is a reference ({contract:<id>.unbilled_value}), rendered by the engine;
   which actions, by the rules of ACTION_RULES (kyrie_engine.agents.report).

For tests it can be scripted to misbehave: `gullible` follows contract ids
it finds in worklog text (a prompt injection succeeding on the model, so the
test can show the tools still refuse), and `misreport` writes its first figure
as a numeral in its first N answers (the report check must refuse it).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from crewai.llms.base_llm import BaseLLM
from pydantic import PrivateAttr

from kyrie_engine.agents.errors import AnalysisStopped
from kyrie_engine.agents.report import ACTION_RULES

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_FIRST_TOOLS = ("contract_figures", "currency_totals", "worklog_anomalies")
# At most this many contracts named in each part of the narrative (the tools list them all).
MOST = 5


def _money(value: Any) -> str:
    return f"{float(value):.2f}"


class OfflineLLM(BaseLLM):
    """Rules instead of a model; see the module docstring."""

    llm_type: str = "offline"
    provider: str = "kyrie"
    gullible: bool = False
    misreport: int = 0
    notes_to_read: int = 2

    _stop: threading.Event | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def bind_stop(self, stop: threading.Event) -> None:
        self._stop = stop

    # -- what CrewAI asks of a model ------------------------------------------

    def supports_function_calling(self) -> bool:
        return True

    def supports_stop_words(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return 1_000_000

    def get_input_tokens_count(self, messages: Any, tools: Any = None, response_model: Any = None) -> int:
        return len(json.dumps(messages, default=str)) // 4

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
        if self._stop is not None and self._stop.is_set():
            raise AnalysisStopped("the job was cancelled or lost")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        answer = self._answer(messages, {t["function"]["name"] for t in tools or []})
        self._track_token_usage_internal(
            {
                "prompt_tokens": self.get_input_tokens_count(messages),
                "completion_tokens": len(json.dumps(answer)) // 4,
                "total_tokens": self.get_input_tokens_count(messages) + len(json.dumps(answer)) // 4,
            }
        )
        return answer

    # -- the rules --------------------------------------------------------------

    def _answer(self, messages: list[dict[str, Any]], tools: set[str]) -> str | list[dict[str, Any]]:
        seen = _tool_results(messages)
        asked = _asked(messages)
        calls: list[tuple[str, dict[str, Any]]] = []
        if tools:
            calls = [(name, {}) for name in _FIRST_TOOLS if name in tools and name not in seen]
            if not calls and "worklog_notes" in tools and "contract_figures" in seen:
                calls = self._notes_to_read(seen, asked)
        if calls:
            base = sum(1 for m in messages if m.get("role") == "assistant")
            return [
                {
                    "id": f"call_{base}_{n}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                for n, (name, args) in enumerate(calls)
            ]
        return json.dumps(self._report(seen))

    def _notes_to_read(self, seen: dict[str, Any], asked: set[str]) -> list[tuple[str, dict[str, Any]]]:
        contracts = seen["contract_figures"]["contracts"]
        wanted = [c["contract_id"] for c in _overrun(contracts)][: self.notes_to_read]
        if self.gullible:
            # Do whatever the worklog text says: read any contract id it names.
            known = {c["contract_id"] for c in contracts}
            for text in seen.get("worklog_notes", []):
                wanted += [u for u in _UUID_RE.findall(text) if u not in known]
        return [
            ("worklog_notes", {"contract_id": cid, "limit": 10})
            for cid in dict.fromkeys(wanted)
            if cid not in asked
        ]

    def _report(self, seen: dict[str, Any]) -> dict[str, Any]:
        """The narrative and actions, every figure, date and name written as a reference."""
        if "contract_figures" not in seen:
            return {"narrative": "No figures were available, so there is nothing to report.", "actions": []}
        figures = seen["contract_figures"]
        contracts = figures["contracts"]
        totals = seen.get("currency_totals", {}).get("totals", [])
        anomalies = seen.get("worklog_anomalies", {}).get("anomalies", [])
        paragraphs: list[list[str]] = [[], [], [], []]  # money, budgets and rates, invoices, housekeeping
        money, budgets, invoices, housekeeping = paragraphs
        actions: list[dict[str, Any]] = []
        first_value: list[tuple[str, Any]] = []  # what `misreport` writes as a numeral instead

        def noted(reference: str, value: Any) -> str:
            if not first_value and isinstance(value, int | float) and not isinstance(value, bool):
                first_value.append((reference, value))
            return reference

        def ref(row: dict[str, Any], field: str) -> str:
            return noted("{contract:%s.%s}" % (row["contract_id"], field), row[field])  # noqa: UP031

        def total(row: dict[str, Any], field: str) -> str:
            return noted("{total:%s.%s}" % (row["currency"], field), row[field])  # noqa: UP031

        def propose(kind: str, c: dict[str, Any], title: str, reason: str) -> None:
            if ACTION_RULES[kind].allows(c):
                actions.append(
                    {"type": kind, "contract_id": c["contract_id"], "title": title, "reason": reason}
                )

        for t in totals:
            money.append(
                f"In {total(t, 'currency')}, {total(t, 'hours_logged')} hours were logged in the period, "
                f"worth {total(t, 'billable_value')} billable; "
                f"{total(t, 'unbilled_value')} ({total(t, 'unbilled_hours')} hours) is still unbilled."
            )

        # A summary names the few that matter most, as a model would: a
        # workspace of fifty contracts must not outgrow the report's length.
        for c in _overrun(contracts)[:MOST]:
            name = f"{ref(c, 'title')} for {ref(c, 'client_name')}"
            used, budget = ref(c, "budget_used_pct"), ref(c, "budget_hours")
            if c["over_budget"]:
                sentence = f"{name} is over budget: {used}% of its {budget} budgeted hours used"
            else:
                sentence = f"{name} has used {used}% of its {budget} budgeted hours"
            if c["budget_exhausted_on"]:
                verb = "ran out on" if c["over_budget"] else "runs out on"
                sentence += (
                    f"; at {ref(c, 'burn_rate_hours_per_week')} hours a week the budget "
                    f"{verb} {ref(c, 'budget_exhausted_on')}"
                )
            budgets.append(sentence + ".")
            propose("flag_budget_overrun", c, f"Budget alert: {ref(c, 'title')}",
                    f"{used}% of {budget} budgeted hours used.")

        for c in _underpriced(contracts)[:MOST]:
            rate = ref(c, "effective_hourly_rate")
            budgets.append(
                f"{ref(c, 'title')} for {ref(c, 'client_name')} now earns an effective {rate} "
                f"{ref(c, 'currency')} an hour on its fixed fee."
            )
            propose("renegotiate_rate", c, f"Renegotiate {ref(c, 'title')}",
                    f"The fixed fee works out at {rate} {ref(c, 'currency')} an hour, "
                    "below the hourly rates of the workspace's other contracts.")

        for c in sorted(
            (c for c in contracts if (c["unbilled_value"] or 0) > 0),
            key=lambda c: (-c["unbilled_value"], c["title"]),
        )[:3]:
            value, hours, currency = ref(c, "unbilled_value"), ref(c, "unbilled_hours"), ref(c, "currency")
            invoices.append(f"{ref(c, 'title')} has {value} {currency} of unbilled work ({hours} hours).")
            propose("send_invoice", c, f"Invoice {ref(c, 'client_name')}: {value} {currency}",
                    f"{hours} billable hours are not invoiced yet.")

        end = figures["period_end"]
        for c in contracts:
            if len(housekeeping) >= MOST:
                break
            if c["status"] == "active" and c["end_date"] and c["end_date"] < end:
                housekeeping.append(f"{ref(c, 'title')} ended on {ref(c, 'end_date')} but is still active.")
                propose("close_contract", c, f"Close {ref(c, 'title')}", "Its end date has passed.")
            elif c["status"] == "active" and not c["hours_logged"] and c["start_date"] <= end:
                housekeeping.append(f"No time was logged on {ref(c, 'title')} in the period.")
                propose("log_missing_time", c, f"Log time on {ref(c, 'title')}",
                        "An active contract with no hours logged.")

        by_id = {c["contract_id"]: c for c in contracts}
        kinds = {
            "day_over_12h": "Very long days",
            "missing_description": "Entries without a description",
            "outside_contract_dates": "Entries outside the contract's dates",
        }
        for a in anomalies[:6]:
            where = f" on {ref(by_id[a['contract_id']], 'title')}" if a.get("contract_id") in by_id else ""
            cite = "{%s.%%s}" % a["ref"]  # noqa: UP031
            housekeeping.append(
                f"{kinds.get(a['kind'], 'Unusual entries')}{where}: {cite % 'occurrences'} "
                f"({cite % 'hours'} hours, {cite % 'first_date'} to {cite % 'last_date'})."
            )
        if "worklog_notes" in seen:
            budgets.append("The worklog notes of the contracts flagged for budget were read.")

        narrative = "\n\n".join(" ".join(p) for p in paragraphs if p)
        if self.misreport > 0 and first_value:
            with self._lock:
                self.misreport -= 1
            # A model that writes a figure itself instead of citing it: the first one, as a numeral.
            reference, value = first_value[0]
            narrative = narrative.replace(reference, _money(value), 1)
        return {"narrative": narrative or "Nothing stands out in this period.", "actions": actions[:12]}


# -- reading the conversation ----------------------------------------------------


def _tool_results(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest JSON result per tool; worklog_notes results as a list of texts."""
    names = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call.get("id")] = call.get("function", {}).get("name")
    seen: dict[str, Any] = {}
    for m in messages:
        if m.get("role") != "tool":
            continue
        name = m.get("name") or names.get(m.get("tool_call_id"))
        content = str(m.get("content") or "")
        if name == "worklog_notes":
            seen.setdefault("worklog_notes", []).append(content)
            continue
        try:
            seen[str(name)] = json.loads(content)
        except json.JSONDecodeError:
            continue
    return seen


def _asked(messages: list[dict[str, Any]]) -> set[str]:
    """Contract ids whose notes were already requested."""
    asked = set()
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            if fn.get("name") == "worklog_notes":
                try:
                    asked.add(str(json.loads(fn.get("arguments") or "{}").get("contract_id")))
                except (json.JSONDecodeError, AttributeError):
                    continue
    return asked


def _overrun(contracts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contracts at 85% of budget or more, or projected to run out before they end."""
    flagged = []
    for c in contracts:
        if c["budget_hours"] is None:
            continue
        early = c["budget_exhausted_on"] and c["end_date"] and c["budget_exhausted_on"] < c["end_date"]
        if c["over_budget"] or (c["budget_used_pct"] or 0) >= 85 or early:
            flagged.append(c)
    return sorted(flagged, key=lambda c: (-(c["budget_used_pct"] or 0), c["title"]))


def _underpriced(contracts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fixed-fee contracts earning less an hour than every hourly contract in their currency."""
    lowest: dict[str, float] = {}
    for c in contracts:
        if c["billing_type"] == "hourly":
            lowest[c["currency"]] = min(lowest.get(c["currency"], c["hourly_rate"]), c["hourly_rate"])
    return [
        c
        for c in contracts
        if c["billing_type"] == "fixed"
        and c["effective_hourly_rate"] is not None
        and c["currency"] in lowest
        and c["effective_hourly_rate"] < lowest[c["currency"]]
    ]
