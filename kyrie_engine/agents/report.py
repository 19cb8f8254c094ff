"""What the model must answer, and the checks that make its numbers the database's.

The model writes prose and picks actions; it never computes a number.  Every
number it reports is checked against the `Ledger`, the rows the tools
returned during that same run:

- `figures` (citations): each names a contract (or a currency, for totals), a
  figure and its value, which must equal the tool's value exactly;
- numbers written in the narrative, titles and reasons must each be one of
  the tools' values at the precision written ("87%" for 87.35 is fine,
  "88%" is not); small integers (counts, "12 hours") and years are exempt;
- every action concerns a contract the tools returned, and is one of the
  fixed types; its payload is built here from the ledger, not by the model.

A report that fails is a `ReportInvalid` whose message tells the model what
to fix; the handler asks again with it, then gives up with that message.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Literal, get_args
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kyrie_engine.agents.figures import Scope, plain

ActionType = Literal[
    "send_invoice", "flag_budget_overrun", "renegotiate_rate", "log_missing_time", "close_contract"
]
ACTION_TYPES: tuple[str, ...] = get_args(ActionType)

# What a report may cite, per contract (kyrie.contract_figures) and per currency (kyrie.currency_totals).
CONTRACT_FIGURES: tuple[str, ...] = (
    "hourly_rate",
    "fixed_fee",
    "budget_hours",
    "start_date",
    "end_date",
    "hours_logged",
    "billable_hours",
    "billable_value",
    "budget_used_hours",
    "budget_used_pct",
    "budget_remaining_hours",
    "over_budget",
    "effective_hourly_rate",
    "unbilled_hours",
    "unbilled_value",
    "burn_rate_hours_per_week",
    "budget_exhausted_on",
)
TOTAL_FIGURES: tuple[str, ...] = (
    "contracts",
    "hours_logged",
    "billable_hours",
    "billable_value",
    "unbilled_hours",
    "unbilled_value",
)
REQUIRED_TOOLS: tuple[str, ...] = ("contract_figures", "currency_totals", "worklog_anomalies")


class ReportInvalid(ValueError):
    """The answer is not an acceptable report; the message says why, for the model to fix."""


# ---------------------------------------------------------------------------
# what the tools returned


class Ledger:
    """Every row the tools returned in one run of the agent (tools may run in parallel threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contracts: dict[UUID, dict[str, Any]] = {}
        self.totals: dict[str, dict[str, Any]] = {}
        self.anomalies: list[dict[str, Any]] = []
        self.called: list[tuple[str, dict[str, Any], int]] = []  # (tool, arguments, rows returned)

    def record(self, tool: str, arguments: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self.called.append((tool, arguments, len(rows)))
            if tool == "contract_figures":
                self.contracts.update({row["contract_id"]: row for row in rows})
            elif tool == "currency_totals":
                self.totals.update({row["currency"]: row for row in rows})
            elif tool == "worklog_anomalies":
                self.anomalies = rows

    def tools_called(self) -> set[str]:
        with self._lock:
            return {name for name, _, _ in self.called}

    def numbers(self) -> set[Decimal]:
        """Every number the tools returned (absolute values: prose says "12.5 hours over")."""
        found: set[Decimal] = set()
        rows = [*self.contracts.values(), *self.totals.values(), *self.anomalies]
        for row in rows:
            for value in row.values():
                if isinstance(value, Decimal | int) and not isinstance(value, bool):
                    found.add(abs(Decimal(value)))
        return found

    def names(self) -> list[str]:
        """Client names and titles: their digits ("Website 2.0") are not figures."""
        texts = {str(row[key]) for row in self.contracts.values() for key in ("client_name", "title")}
        return sorted(texts, key=len, reverse=True)


# ---------------------------------------------------------------------------
# what the model answers


class Citation(BaseModel):
    """One number the report relies on, as the tool returned it."""

    model_config = ConfigDict(extra="forbid")

    contract_id: UUID | None = None
    currency: str | None = None
    figure: str
    value: Any = None


class Proposal(BaseModel):
    """An action for a member to accept or dismiss."""

    model_config = ConfigDict(extra="ignore")  # a payload the model invents is dropped, not trusted

    type: ActionType
    contract_id: UUID
    title: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=2000)

    @field_validator("title", "reason")
    @classmethod
    def _stripped(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        return value


class ModelReport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    narrative: str = Field(min_length=1, max_length=8000)
    figures: list[Citation] = Field(default_factory=list, max_length=400)
    actions: list[Proposal] = Field(default_factory=list, max_length=20)


def parse_answer(text: str) -> ModelReport:
    """The JSON object in the model's final answer (code fences and prose around it tolerated)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ReportInvalid("the answer must be one JSON object with narrative, figures and actions")
    try:
        data = json.loads(text[start : end + 1], parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise ReportInvalid(f"the answer is not valid JSON ({exc})") from None
    try:
        return ModelReport.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ReportInvalid(
            "the answer does not match the report format: " + "; ".join(problems[:8])
        ) from None


# ---------------------------------------------------------------------------
# the checks


def _same(value: Any, expected: Any) -> bool:
    if expected is None:
        return value is None
    if isinstance(expected, bool):
        return value is expected
    if isinstance(expected, Decimal | int):
        if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
            return False
        try:
            return Decimal(str(value)) == Decimal(expected)
        except InvalidOperation:
            return False
    if isinstance(expected, dt.date):
        return str(value) == expected.isoformat()
    return bool(value == expected)


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DATE_RE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_NUMBER_RE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\w)")


def _exempt(integer: str, decimals: str | None) -> bool:
    if decimals is not None or "," in integer:
        return False
    n = int(integer)
    return n < 100 or 1900 <= n <= 2100  # counts, thresholds, years


def unsupported_numbers(text: str, ledger: Ledger) -> list[str]:
    """Numbers in `text` that match none of the tools' values at the precision written."""
    for name in ledger.names():
        text = text.replace(name, " ")
    text = _DATE_RE.sub(" ", _UUID_RE.sub(" ", text))
    values = ledger.numbers()
    wrong = []
    for match in _NUMBER_RE.finditer(text):
        integer, decimals = match.group(1), match.group(2)
        if _exempt(integer, decimals):
            continue
        written = Decimal(integer.replace(",", "") + ("." + decimals if decimals else ""))
        quantum = Decimal(1).scaleb(-len(decimals or ""))
        if not any(v.quantize(quantum, rounding=ROUND_HALF_UP) == written for v in values):
            wrong.append(match.group(0))
    return wrong


def check(report: ModelReport, ledger: Ledger) -> None:
    """Raise ReportInvalid listing every problem, or return when the report is acceptable."""
    problems: list[str] = []
    missing = [t for t in REQUIRED_TOOLS if t not in ledger.tools_called()]
    if missing:
        problems.append(f"call {', '.join(missing)} before answering: the report must rest on their figures")

    for n, cite in enumerate(report.figures):
        where = f"figures[{n}]"
        if cite.contract_id is not None:
            row = ledger.contracts.get(cite.contract_id)
            names = CONTRACT_FIGURES
            if row is None:
                problems.append(f"{where} cites contract {cite.contract_id}, which no tool returned")
                continue
        elif cite.currency is not None:
            row = ledger.totals.get(cite.currency.upper())
            names = TOTAL_FIGURES
            if row is None:
                problems.append(
                    f"{where} cites totals in {cite.currency}, which currency_totals did not return"
                )
                continue
        else:
            problems.append(f"{where} needs a contract_id (or a currency, for totals)")
            continue
        if cite.figure not in names:
            problems.append(f"{where}: unknown figure {cite.figure!r} (one of: {', '.join(names)})")
        elif not _same(cite.value, row[cite.figure]):
            expected = json.dumps(plain(row[cite.figure]))
            problems.append(
                f"{where}: {cite.figure} is {expected} according to the tools, "
                f"not {json.dumps(plain(cite.value))}"
            )

    texts = {"narrative": report.narrative}
    for n, action in enumerate(report.actions):
        texts[f"actions[{n}].title"] = action.title
        texts[f"actions[{n}].reason"] = action.reason
        row = ledger.contracts.get(action.contract_id)
        if row is None:
            problems.append(
                f"actions[{n}] concerns contract {action.contract_id}, which is not among the contracts "
                "the tools returned"
            )
        elif action.type == "send_invoice" and not (row["unbilled_hours"] or 0) > 0:
            problems.append(f"actions[{n}]: send_invoice for a contract with no unbilled hours")
        elif action.type == "flag_budget_overrun" and row["budget_hours"] is None:
            problems.append(f"actions[{n}]: flag_budget_overrun for a contract without a budget")
    for where, text in texts.items():
        wrong = unsupported_numbers(text, ledger)
        if wrong:
            problems.append(
                f"{where} mentions {', '.join(wrong[:5])}, which match no figure the tools returned "
                "(copy figures exactly; never compute new ones)"
            )
    if problems:
        raise ReportInvalid("; ".join(problems[:12]))


# ---------------------------------------------------------------------------
# what is stored


_PAYLOAD_FIGURES: dict[str, tuple[str, ...]] = {
    "send_invoice": ("currency", "unbilled_hours", "unbilled_value"),
    "flag_budget_overrun": (
        "budget_hours",
        "budget_used_hours",
        "budget_used_pct",
        "budget_remaining_hours",
        "budget_exhausted_on",
        "burn_rate_hours_per_week",
    ),
    "renegotiate_rate": (
        "billing_type",
        "currency",
        "hourly_rate",
        "fixed_fee",
        "effective_hourly_rate",
        "budget_used_pct",
    ),
    "log_missing_time": ("hours_logged", "burn_rate_hours_per_week"),
    "close_contract": ("status", "end_date", "currency", "unbilled_value"),
}


def action_payload(action: Proposal, ledger: Ledger, scope: Scope) -> dict[str, Any]:
    """The figures an action rests on, from the ledger (the database's numbers, never the model's)."""
    row = ledger.contracts[action.contract_id]
    payload: dict[str, Any] = {key: row[key] for key in _PAYLOAD_FIGURES[action.type]}
    payload["period_start"] = scope.period_start
    payload["period_end"] = scope.period_end
    if action.type == "log_missing_time":
        payload["anomalies"] = [a for a in ledger.anomalies if a["contract_id"] == action.contract_id]
    return plain(payload)


def unique_actions(actions: list[Proposal]) -> list[Proposal]:
    """One action per (type, contract): the first the model gave."""
    seen: dict[tuple[str, UUID], Proposal] = {}
    for action in actions:
        seen.setdefault((action.type, action.contract_id), action)
    return list(seen.values())
