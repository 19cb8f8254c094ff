"""`kyrie-engine schema`: the JSON Schema the Next.js app turns into TypeScript, checked against
what a real CFO analysis (offline model, the books of tests/cfo_support.py) writes.

Validated with jsonschema against the printed document itself, not with the pydantic models it
came from: the document is what the app consumes.  Then the other way round: a result that
drifts (a figure renamed, an unknown action type, a payload of the wrong type) is refused.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import asyncpg
import jsonschema
import pytest
from cfo_support import PERIOD, actions_of, analyse, build_books

from kyrie_engine.agents.report import ACTION_TYPES, CONTRACT_FIELDS
from kyrie_engine.schema_cli import document


def validator_for(pointer: str) -> jsonschema.Draft202012Validator:
    """A validator of the document's part at `pointer` (its $defs still reachable)."""
    doc = document()
    jsonschema.Draft202012Validator.check_schema(doc)
    part: Any = doc
    for key in pointer.strip("/").split("/"):
        part = part[key]
    return jsonschema.Draft202012Validator({**part, "$defs": doc["$defs"]},
                                           format_checker=jsonschema.FormatChecker())


def test_the_command_prints_the_document() -> None:
    out = subprocess.run([sys.executable, "-m", "kyrie_engine.cli", "schema"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    doc = json.loads(out)
    assert doc == json.loads(json.dumps(document()))
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(doc["properties"]["jobs"]["properties"]) == {"cfo.analyze"}
    assert set(doc["properties"]["ai_actions"]["properties"]) == set(ACTION_TYPES)
    # Every figure the report may cite is in the contract figures' shape, nullable.
    figures = doc["$defs"]["ContractFigures"]
    assert set(CONTRACT_FIELDS) <= set(figures["required"])
    assert {"type": "null"} in figures["properties"]["budget_used_pct"]["anyOf"]


@pytest.fixture
async def analysed(db: asyncpg.Connection, db_dsn: str) -> dict[str, Any]:
    books = await build_books(db)
    job = await analyse(db_dsn, db, books.workspace_id, books.owner, PERIOD)
    assert job["status"] == "completed", job["error"]
    return {**job, "actions": await actions_of(db, job["id"])}


async def test_a_real_analysis_validates_against_the_schema(analysed: dict[str, Any]) -> None:
    jobs = validator_for("/properties/jobs/properties/cfo.analyze")
    jobs.validate({k: analysed[k] for k in ("result", "progress", "usage")})
    assert analysed["actions"], "the books are made to give actions"
    for action in analysed["actions"]:
        validator_for(f"/properties/ai_actions/properties/{action['type']}").validate(action["payload"])
    types = {a["type"] for a in analysed["result"]["actions"]}
    assert types == {a["type"] for a in analysed["actions"]}


async def test_a_result_that_drifts_from_the_schema_is_refused(analysed: dict[str, Any]) -> None:
    jobs = validator_for("/properties/jobs/properties/cfo.analyze")
    shapes = {k: analysed[k] for k in ("result", "progress", "usage")}

    def broken(change: Any) -> dict[str, Any]:
        copied = copy.deepcopy(shapes)
        change(copied)
        return copied

    drifts = [
        lambda s: s["result"]["figures"][0].update(unbilled=s["result"]["figures"][0].pop("unbilled_value")),
        lambda s: s["result"]["actions"][0].update(type="wire_money"),
        lambda s: s["result"]["actions"][0]["payload"].update(period_start="last spring"),
        lambda s: s["result"]["totals"][0].update(contracts="three"),
        lambda s: s["progress"].pop("step"),
        lambda s: s["usage"].update(total_tokens="many"),
    ]
    for drift in drifts:
        assert not jobs.is_valid(broken(drift))
