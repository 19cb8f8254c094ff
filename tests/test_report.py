"""The report check: the model writes no numbers, the engine renders every one from the tools' rows.

The ledger here is filled the way the tools fill it (rows as kyrie.contract_figures & co. return
them); the check and the rendering are pure functions of it.  The end-to-end runs (offline model,
fake Groq) are in test_cfo.py and test_groq_llm.py.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from kyrie_engine.agents.figures import Scope
from kyrie_engine.agents.report import (
    ACTION_RULES,
    Ledger,
    ModelReport,
    ReportInvalid,
    check,
    numbers_in,
    parse_answer,
)

C = uuid.UUID("6f1c1d2e-0000-4000-8000-000000000001")
SCOPE = Scope(uuid.uuid4(), uuid.uuid4(), dt.date(2026, 1, 1), dt.date(2026, 3, 31))


def contract(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "contract_id": C, "title": "Website 2.0", "client_name": "Acme", "currency": "USD",
        "billing_type": "hourly", "status": "active", "hourly_rate": Decimal("100.00"), "fixed_fee": None,
        "budget_hours": Decimal("120.00"), "start_date": dt.date(2026, 1, 1), "end_date": None,
        "hours_logged": Decimal("125.50"), "billable_hours": Decimal("125.00"),
        "billable_value": Decimal("12500.00"), "budget_used_hours": Decimal("125.50"),
        "budget_used_pct": Decimal("104.58"), "budget_remaining_hours": Decimal("-5.50"),
        "over_budget": True, "effective_hourly_rate": None, "unbilled_hours": Decimal("12.50"),
        "unbilled_value": Decimal("1250.00"), "burn_rate_hours_per_week": Decimal("9.65"),
        "budget_exhausted_on": dt.date(2026, 3, 20),
    }
    row.update(changes)
    return row


def ledger(**changes: Any) -> Ledger:
    book = Ledger()
    book.record("contract_figures", {}, [contract(**changes)])
    book.record("currency_totals", {}, [{
        "currency": "USD", "contracts": 1, "hours_logged": Decimal("125.50"),
        "billable_hours": Decimal("125"),
        "billable_value": Decimal("12500.00"), "unbilled_hours": Decimal("12.50"),
        "unbilled_value": Decimal("1250.00"),
    }])
    book.record("worklog_anomalies", {}, [{
        "kind": "day_over_12h", "contract_id": C, "user_id": uuid.uuid4(), "occurrences": 3,
        "hours": Decimal("40.50"), "first_date": dt.date(2026, 2, 2), "last_date": dt.date(2026, 2, 9),
    }])
    return book


def report(narrative: str, title: str = "Invoice {contract:" + str(C) + ".client_name}",
           reason: str = "Billable work is not invoiced yet.", kind: str = "send_invoice") -> ModelReport:
    return ModelReport.model_validate({
        "narrative": narrative,
        "actions": [{"type": kind, "contract_id": str(C), "title": title, "reason": reason}],
    })


REF = "{contract:%s.unbilled_value}" % C  # noqa: UP031


def test_references_are_rendered_to_the_tools_values() -> None:
    text = (
        "{contract:C.title} for {contract:C.client_name} has {contract:C.unbilled_value} "
        "{contract:C.currency} unbilled ({contract:C.unbilled_hours} hours); it used "
        "{contract:C.budget_used_pct}% of its budget, which ran out on {contract:C.budget_exhausted_on}. "
        "Over budget: {contract:C.over_budget}. In total {total:usd.billable_value} billable over "
        "{total:USD.contracts} contract, {anomaly:1.occurrences} very long days ({anomaly:1.hours} hours) "
        "from {period.start} to {period.end}."
    ).replace("contract:C.", f"contract:{str(C).upper()}.")  # any case of the id resolves
    reason = "{contract:" + str(C) + ".unbilled_hours} hours to bill."
    rendered = check(report(text, reason=reason), ledger(), SCOPE)
    assert rendered.narrative == (
        "Website 2.0 for Acme has 1,250.00 USD unbilled (12.5 hours); it used 104.58% of its budget, "
        "which ran out on 2026-03-20. Over budget: yes. In total 12,500.00 billable over 1 contract, "
        "3 very long days (40.5 hours) from 2026-01-01 to 2026-03-31."
    )
    assert rendered.actions[0].title == "Invoice Acme"
    assert rendered.actions[0].reason == "12.5 hours to bill."
    cited = {(c.ref, c.figure): c.value for c in rendered.citations}
    assert cited[(f"contract:{C}", "unbilled_value")] == Decimal("1250.00")
    assert cited[("total:USD", "billable_value")] == Decimal("12500.00")
    assert cited[("anomaly:1", "hours")] == Decimal("40.50")
    assert cited[("period", "end")] == dt.date(2026, 3, 31)


INVENTED = [
    "12.5k USD", "$12.5M", "10 000 USD", "9e3", "1_000_000", "0x3E8", "１２", "1,250.00", "1250",
    "12", "½ of the budget", "Ⅻ hours", "²", "十二", "٣", "𝟏𝟐", "XII hours", "MMXXVI",
    "twelve thousand", "a dozen hours", "dozens of hours", "one contract", "Twenty-five", "ｔｗｅｌｖｅ",
    "three hundred", "a million", "zero",
]


@pytest.mark.parametrize("written", INVENTED)
@pytest.mark.parametrize("where", ["narrative", "title", "reason"])
def test_any_number_the_model_writes_is_a_rejection(written: str, where: str) -> None:
    texts = {"narrative": f"Unbilled work is {REF} USD.", "title": "Invoice the client", "reason": "Bill it."}
    texts[where] = f"{texts[where]} About {written} is at stake."
    answer = report(texts["narrative"], title=texts["title"], reason=texts["reason"])
    with pytest.raises(ReportInvalid) as refused:
        check(answer, ledger(), SCOPE)
    message = str(refused.value)
    place = "narrative" if where == "narrative" else f"actions[0].{where}"
    assert f"{place} writes " in message and "write no numbers" in message


@pytest.mark.parametrize(
    "fine",
    ["No one logged time on it.", "The first half of the period.", "It is twice as busy.",
     "I would invoice now.", "A once-off fee.", "Call the client."],
)
def test_ordinals_multipliers_and_pronouns_are_prose(fine: str) -> None:
    assert numbers_in(fine) == []
    check(report(f"{fine} {REF}"), ledger(), SCOPE)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{contract:%s.profit}" % C, "names no field of a contract"),  # noqa: UP031
        ("{contract:%s.unbilled_value}" % uuid.uuid4(), "is not one contract_figures returned"),  # noqa: UP031
        ("{contract:acme.title}", "is not one contract_figures returned"),
        ("{total:EUR.unbilled_value}", "returned no totals in EUR"),
        ("{anomaly:2.hours}", "returned no anomaly 2"),
        ("{anomaly:0.hours}", "returned no anomaly 0"),
        ("{unbilled_value}", "is not a reference"),
        ("{contract:%s.fixed_fee}" % C, "has no value"),  # noqa: UP031
        ("{period.middle}", "names no field of a period"),
        ("the fee is {contract:%s.hourly_rate" % C, "a brace that opens or closes no reference"),  # noqa: UP031
        ("{{contract:%s.title}}" % C, "a brace that opens or closes no reference"),  # noqa: UP031
    ],
)
def test_an_unknown_or_empty_reference_is_a_rejection(text: str, problem: str) -> None:
    with pytest.raises(ReportInvalid) as refused:
        check(report(f"Look: {text}."), ledger(), SCOPE)
    assert problem in str(refused.value)


def test_rendered_names_may_hold_digits_but_the_models_text_may_not() -> None:
    rendered = check(report("{contract:%s.title} needs attention." % C), ledger(), SCOPE)  # noqa: UP031
    assert rendered.narrative == "Website 2.0 needs attention."
    with pytest.raises(ReportInvalid):
        check(report("Website 2.0 needs attention."), ledger(), SCOPE)


@pytest.mark.parametrize(
    ("kind", "changes", "allowed"),
    [
        ("send_invoice", {}, True),
        ("send_invoice", {"unbilled_hours": Decimal(0), "unbilled_value": Decimal(0)}, False),
        ("flag_budget_overrun", {}, True),
        ("flag_budget_overrun", {"budget_hours": None}, False),
        ("renegotiate_rate", {}, True),
        ("renegotiate_rate", {"billing_type": "fixed", "hourly_rate": None, "fixed_fee": Decimal(1)}, False),
        ("log_missing_time", {}, True),
        ("log_missing_time", {"status": "completed"}, False),
        ("close_contract", {}, True),
        ("close_contract", {"status": "cancelled"}, False),
    ],
)
def test_each_action_type_keeps_its_rule(kind: str, changes: dict[str, Any], allowed: bool) -> None:
    answer = report(f"See {REF}.", title="Act on it", kind=kind)
    if allowed:
        assert check(answer, ledger(**changes), SCOPE).actions[0].type == kind
    else:
        with pytest.raises(ReportInvalid) as refused:
            check(answer, ledger(**changes), SCOPE)
        assert f"actions[0]: {kind} {ACTION_RULES[kind].when}" in str(refused.value)


def test_a_figures_list_the_model_adds_is_ignored() -> None:
    answer = parse_answer(
        '{"narrative": "See %s.", "figures": [{"contract_id": "%s", "figure": "unbilled_value", '  # noqa: UP031
        '"value": 99999}], "actions": []}' % (REF, C)
    )
    rendered = check(answer, ledger(), SCOPE)
    assert [(c.figure, c.value) for c in rendered.citations] == [("unbilled_value", Decimal("1250.00"))]


async def test_the_action_rules_are_the_types_the_table_allows(db: asyncpg.Connection) -> None:
    definition = await db.fetchval(
        "select pg_get_constraintdef(c.oid) from pg_constraint c "
        "where c.conrelid = 'public.ai_actions'::regclass and c.contype = 'c' "
        "and pg_get_constraintdef(c.oid) like '%type%send_invoice%'"
    )
    assert set(re.findall(r"'([a-z_]+)'::text", definition)) == set(ACTION_RULES)
