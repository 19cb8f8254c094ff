"""What the model must answer, and why its numbers can only be the database's.

The model writes no numbers.  Where its prose needs a figure it writes a
reference, `{contract:<id>.unbilled_value}`, `{total:USD.billable_value}`,
`{anomaly:2.hours}`, `{period.end}`, and the engine renders every number
from the `Ledger`, the rows the tools returned during that same run.  A
notation the check does not parse cannot slip a number through, because the
check does not parse notations: once the references are taken out, any
numeric character (ASCII or not: `１２`, `½`, `Ⅻ`, `²`), number word or Roman
numeral left in the narrative, an action's title or its reason is a
rejection.  What counts as a number word is in `NUMBER_WORDS` (cardinals,
scale words, "dozen"); ordinals and multipliers ("first", "twice") are
prose, not figures, and pass.

Each action type's rule (when it may be proposed, which figures its payload
carries) is one row of `ACTION_RULES`, read by the prompt (crew.py), the
check below and the offline model; tests/test_cfo.py ties it to the CHECK
on ai_actions.type.

A report that fails is a `ReportInvalid` whose message tells the model what
to fix; the handler asks again with it, then gives up with that message.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kyrie_engine.agents.figures import Scope, plain

# What a reference may name, per contract (kyrie.contract_figures) and per
# currency (kyrie.currency_totals), with how the engine writes it.
Style = str  # "money", "hours", "percent", "count", "date", "yes/no", "text"

CONTRACT_FIELDS: dict[str, Style] = {
    "title": "text",
    "client_name": "text",
    "currency": "text",
    "billing_type": "text",
    "status": "text",
    "hourly_rate": "money",
    "fixed_fee": "money",
    "budget_hours": "hours",
    "start_date": "date",
    "end_date": "date",
    "hours_logged": "hours",
    "billable_hours": "hours",
    "billable_value": "money",
    "budget_used_hours": "hours",
    "budget_used_pct": "percent",
    "budget_remaining_hours": "hours",
    "over_budget": "yes/no",
    "effective_hourly_rate": "money",
    "unbilled_hours": "hours",
    "unbilled_value": "money",
    "burn_rate_hours_per_week": "hours",
    "budget_exhausted_on": "date",
}
TOTAL_FIELDS: dict[str, Style] = {
    "currency": "text",
    "contracts": "count",
    "hours_logged": "hours",
    "billable_hours": "hours",
    "billable_value": "money",
    "unbilled_hours": "hours",
    "unbilled_value": "money",
}
ANOMALY_FIELDS: dict[str, Style] = {
    "kind": "text",
    "occurrences": "count",
    "hours": "hours",
    "first_date": "date",
    "last_date": "date",
}
PERIOD_FIELDS: dict[str, Style] = {"start": "date", "end": "date"}
# The figures (not the words) a report may rest on, as the prompt lists them.
CONTRACT_FIGURES: tuple[str, ...] = tuple(k for k, v in CONTRACT_FIELDS.items() if v != "text")
TOTAL_FIGURES: tuple[str, ...] = tuple(k for k, v in TOTAL_FIELDS.items() if v != "text")
REQUIRED_TOOLS: tuple[str, ...] = ("contract_figures", "currency_totals", "worklog_anomalies")


@dataclass(frozen=True)
class ActionRule:
    """One action type: when it may be proposed (`allows`, stated for the model as `when`),
    and the figures its payload carries, copied from the ledger."""

    type: str
    when: str
    allows: Callable[[Mapping[str, Any]], bool]
    payload: tuple[str, ...]


ACTION_RULES: dict[str, ActionRule] = {
    rule.type: rule
    for rule in (
        ActionRule(
            "send_invoice", "only where unbilled_hours > 0",
            lambda c: (c["unbilled_hours"] or 0) > 0,
            ("currency", "unbilled_hours", "unbilled_value"),
        ),
        ActionRule(
            "flag_budget_overrun", "only for a contract with budget_hours",
            lambda c: c["budget_hours"] is not None,
            ("budget_hours", "budget_used_hours", "budget_used_pct", "budget_remaining_hours",
             "budget_exhausted_on", "burn_rate_hours_per_week"),
        ),
        ActionRule(
            "renegotiate_rate", "only for a contract with an hourly_rate or an effective_hourly_rate",
            lambda c: c["hourly_rate"] is not None or c["effective_hourly_rate"] is not None,
            ("billing_type", "currency", "hourly_rate", "fixed_fee", "effective_hourly_rate",
             "budget_used_pct"),
        ),
        ActionRule(
            "log_missing_time", "only for an active contract",
            lambda c: c["status"] == "active",
            ("hours_logged", "burn_rate_hours_per_week"),
        ),
        ActionRule(
            "close_contract", "only for an active contract",
            lambda c: c["status"] == "active",
            ("status", "end_date", "currency", "unbilled_value"),
        ),
    )
}
ACTION_TYPES: tuple[str, ...] = tuple(ACTION_RULES)


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


def anomaly_ref(n: int) -> str:
    """How the tool names its n-th anomaly (from 1) for the model to cite."""
    return f"anomaly:{n}"


# ---------------------------------------------------------------------------
# what the model answers


class Proposal(BaseModel):
    """An action for a member to accept or dismiss."""

    model_config = ConfigDict(extra="ignore")  # a payload the model invents is dropped, not trusted

    type: str
    contract_id: UUID
    title: str = Field(min_length=1, max_length=400)
    reason: str = Field(min_length=1, max_length=2000)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ACTION_RULES:
            raise ValueError(f"one of {', '.join(ACTION_TYPES)}")
        return value

    @field_validator("title", "reason")
    @classmethod
    def _stripped(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        return value


class ModelReport(BaseModel):
    # Anything else the model adds (a "figures" list of its own, say) is ignored:
    # the engine lists what was cited from the references it rendered.
    model_config = ConfigDict(extra="ignore")

    narrative: str = Field(min_length=1, max_length=8000)
    actions: list[Proposal] = Field(default_factory=list, max_length=20)


def parse_answer(text: str) -> ModelReport:
    """The JSON object in the model's final answer (code fences and prose around it tolerated)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ReportInvalid("the answer must be one JSON object with narrative and actions")
    try:
        data = json.loads(text[start : end + 1])
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
# references, rendered from the ledger


_REFERENCE_RE = re.compile(r"\{([^{}]*)\}")
_REFERENCE_SHAPE = re.compile(
    r"(?:(?P<kind>contract|total|anomaly):(?P<key>[^.\s]+)|(?P<period>period))\.(?P<field>[a-z_]+)"
)


@dataclass(frozen=True)
class Citation:
    """One reference the report used, with the value the engine wrote for it."""

    ref: str
    value: Any
    contract_id: UUID | None = None
    currency: str | None = None
    anomaly: int | None = None
    figure: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref, "figure": self.figure, "value": plain(self.value)}
        if self.contract_id is not None:
            out["contract_id"] = str(self.contract_id)
        if self.currency is not None:
            out["currency"] = self.currency
        if self.anomaly is not None:
            out["anomaly"] = self.anomaly
        return out


def _trimmed(value: Decimal | int | float) -> str:
    text = f"{Decimal(str(value)):,.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def render_value(value: Any, style: Style) -> str:
    """How the engine writes a figure: money with two decimals and thousands
    separators, hours and percentages without trailing zeros, dates in ISO."""
    if style == "yes/no":
        return "yes" if value else "no"
    if style == "money":
        return f"{Decimal(str(value)):,.2f}"
    if style in ("hours", "percent"):
        return _trimmed(value)
    if style == "count":
        return f"{int(value):,}"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


class _Renderer:
    """Resolves references against one ledger and scope; collects problems instead of raising."""

    def __init__(self, ledger: Ledger, scope: Scope | None) -> None:
        self.ledger = ledger
        self.scope = scope
        self.cited: dict[str, Citation] = {}
        self.problems: list[str] = []

    def resolve(self, where: str, inner: str) -> str | None:
        shape = _REFERENCE_SHAPE.fullmatch(inner.strip())
        if shape is None:
            self.problems.append(
                f"{where}: {{{inner}}} is not a reference (write {{contract:<contract_id>.<figure>}}, "
                "{total:<currency>.<figure>}, {anomaly:<n>.<field>} or {period.start}/{period.end})"
            )
            return None
        kind, key, name = shape["kind"] or "period", shape["key"], shape["field"]
        row, fields, citation = self._row(where, kind, key)
        if row is None:
            return None
        if name not in fields:
            self.problems.append(
                f"{where}: {{{inner}}} names no field of a {kind} (one of: {', '.join(fields)})"
            )
            return None
        value = row[name]
        if value is None:
            self.problems.append(f"{where}: {{{inner}}} has no value (leave it out of the text)")
            return None
        # The canonical name, whatever spelling resolved (`total:usd`, an upper-case id).
        canonical = citation.get("contract_id") or citation.get("currency") or citation.get("anomaly")
        ref = "period" if kind == "period" else f"{kind}:{canonical}"
        self.cited.setdefault(f"{ref}.{name}", Citation(ref=ref, figure=name, value=value, **citation))
        return render_value(value, fields[name])

    def _row(
        self, where: str, kind: str, key: str | None
    ) -> tuple[Mapping[str, Any] | None, dict[str, Style], dict[str, Any]]:
        if kind == "contract":
            try:
                contract = UUID(str(key))
            except ValueError:
                contract = None
            row = self.ledger.contracts.get(contract) if contract else None
            if row is None:
                self.problems.append(f"{where}: contract {key} is not one contract_figures returned")
            return row, CONTRACT_FIELDS, {"contract_id": contract}
        if kind == "total":
            currency = str(key).upper()
            row = self.ledger.totals.get(currency)
            if row is None:
                self.problems.append(f"{where}: currency_totals returned no totals in {key}")
            return row, TOTAL_FIELDS, {"currency": currency}
        if kind == "anomaly":
            n = int(key) if key and key.isascii() and key.isdigit() else 0
            if not 1 <= n <= len(self.ledger.anomalies):
                self.problems.append(f"{where}: worklog_anomalies returned no anomaly {key}")
                return None, ANOMALY_FIELDS, {}
            return self.ledger.anomalies[n - 1], ANOMALY_FIELDS, {"anomaly": n}
        if self.scope is None:
            self.problems.append(f"{where}: the period is not known here")
            return None, PERIOD_FIELDS, {}
        return {"start": self.scope.period_start, "end": self.scope.period_end}, PERIOD_FIELDS, {}

    def render(self, where: str, text: str) -> str:
        """The text with every reference written out; problems noted for what cannot be."""
        bare = _REFERENCE_RE.sub(" ", text)
        if "{" in bare or "}" in bare:
            self.problems.append(f"{where}: a brace that opens or closes no reference")
        found = numbers_in(bare)
        if found:
            self.problems.append(
                f"{where} writes {', '.join(repr(f) for f in found[:5])}: write no numbers, numerals or "
                "number words yourself; cite every figure by reference, e.g. {contract:<id>.unbilled_value}"
            )

        def one(match: re.Match[str]) -> str:
            written = self.resolve(where, match.group(1))
            return match.group(0) if written is None else written

        return _REFERENCE_RE.sub(one, text)


# Cardinals and scale words in English; "dozen" too ("a dozen hours" is a
# count the model made up).  Ordinals and multipliers are not listed.
NUMBER_WORDS: frozenset[str] = frozenset(
    """zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty
    ninety hundred hundreds thousand thousands million millions billion billions trillion
    trillions dozen dozens""".split()
)
_WORD_RE = re.compile(r"[^\W\d_]+")
# Two or more capitals forming a valid Roman numeral ("XII", "MMXXVI"); a lone
# "I" is the pronoun, and a lone "M" after a number is caught by the number.
_ROMAN_RE = re.compile(r"\b(?=[MDCLXVI]{2,}\b)M{0,4}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})\b")


def numbers_in(text: str) -> list[str]:
    """Every way `text` writes a number: numeric characters of any script (`str.isnumeric`:
    digits, full-width digits, fractions, superscripts, Roman numeral signs, CJK numerals),
    number words (after NFKC, so full-width letters count) and Roman numerals."""
    found = [
        token.strip(".,;:!?()[]\"'")
        for token in text.split()
        if any(ch.isnumeric() for ch in token)
    ]
    folded = re.sub(r"\bno one\b", "nobody", unicodedata.normalize("NFKC", text), flags=re.IGNORECASE)
    found += [word for word in _WORD_RE.findall(folded) if word.lower() in NUMBER_WORDS]
    found += [m.group(0) for m in _ROMAN_RE.finditer(folded)]
    return found


# ---------------------------------------------------------------------------
# the checks, and the report as stored


@dataclass(frozen=True)
class RenderedAction:
    type: str
    contract_id: UUID
    title: str
    reason: str


@dataclass(frozen=True)
class RenderedReport:
    """The report with every number written by the engine, and what it cited."""

    narrative: str
    actions: list[RenderedAction]
    citations: list[Citation]


# ai_actions: length(btrim(title)) between 1 and 200, reason up to 4000.
_TITLE_LIMIT, _REASON_LIMIT = 200, 4000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def check(report: ModelReport, ledger: Ledger, scope: Scope | None = None) -> RenderedReport:
    """The report rendered from the ledger, or ReportInvalid listing every problem."""
    problems: list[str] = []
    missing = [t for t in REQUIRED_TOOLS if t not in ledger.tools_called()]
    if missing:
        problems.append(f"call {', '.join(missing)} before answering: the report must rest on their figures")

    renderer = _Renderer(ledger, scope)
    narrative = renderer.render("narrative", report.narrative)
    actions: list[RenderedAction] = []
    for n, action in enumerate(report.actions):
        row = ledger.contracts.get(action.contract_id)
        rule = ACTION_RULES[action.type]
        if row is None:
            problems.append(
                f"actions[{n}] concerns contract {action.contract_id}, which is not among the contracts "
                "the tools returned"
            )
        elif not rule.allows(row):
            problems.append(f"actions[{n}]: {action.type} {rule.when}")
        title = renderer.render(f"actions[{n}].title", action.title)
        reason = renderer.render(f"actions[{n}].reason", action.reason)
        actions.append(RenderedAction(
            action.type, action.contract_id, _clip(title, _TITLE_LIMIT), _clip(reason, _REASON_LIMIT)
        ))
    problems += renderer.problems
    if problems:
        raise ReportInvalid("; ".join(problems[:12]))
    return RenderedReport(narrative, actions, list(renderer.cited.values()))


def action_payload(action: RenderedAction, ledger: Ledger, scope: Scope) -> dict[str, Any]:
    """The figures an action rests on, from the ledger (the database's numbers, never the model's)."""
    row = ledger.contracts[action.contract_id]
    payload: dict[str, Any] = {key: row[key] for key in ACTION_RULES[action.type].payload}
    payload["period_start"] = scope.period_start
    payload["period_end"] = scope.period_end
    if action.type == "log_missing_time":
        payload["anomalies"] = [a for a in ledger.anomalies if a["contract_id"] == action.contract_id]
    return plain(payload)


def unique_actions(actions: list[RenderedAction]) -> list[RenderedAction]:
    """One action per (type, contract): the first the model gave."""
    seen: dict[tuple[str, UUID], RenderedAction] = {}
    for action in actions:
        seen.setdefault((action.type, action.contract_id), action)
    return list(seen.values())
