"""`kyrie-engine schedules list|add|remove`: `kyrie.schedules` from a terminal.

The same rows an operator writes from psql (README, "Schedules"); `add`
checks the name, the cron expression, the time zone and the kind first and
says what is wrong in words.  Exit status: 0 done, 1 no such schedule or it
exists already, 2 usage or a refused value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from uuid import UUID

import asyncpg

from kyrie_engine import schedules
from kyrie_engine.db import connect_kwargs, driver_dsn
from kyrie_engine.queue import check_kind
from kyrie_engine.settings import database_url_from_env
from kyrie_engine.terminal import table, when


class CliError(Exception):
    """A message for the operator; exit status 1."""


def _payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a payload is a JSON object, e.g. '{\"period\": \"month\"}'")
    return value


async def cmd_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    found = await schedules.list_schedules(conn)
    if args.json:
        print(json.dumps([
            {"name": s.name, "cron": s.cron, "timezone": s.timezone, "kind": s.kind, "payload": s.payload,
             "workspace_id": s.workspace_id, "user_id": s.user_id, "priority": s.priority,
             "enabled": s.enabled, "last_slot": s.last_slot, "next_slot": s.next_run_at}
            for s in found
        ], indent=2, default=str))
        return 0
    print(table(
        ["name", "cron", "timezone", "kind", "enabled", "last slot", "next slot", "workspace"],
        [(s.name, s.cron, s.timezone, s.kind, "yes" if s.enabled else "no", when(s.last_slot),
          when(s.next_run_at), s.workspace_id or "-") for s in found],
    ))
    return 0


async def cmd_add(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    try:
        added = await schedules.add(
            conn, args.name, args.cron, args.kind, args.payload, timezone=args.timezone,
            workspace_id=args.workspace, user_id=args.user, priority=args.priority,
            enabled=not args.disabled, replace=args.replace,
        )
    except asyncpg.UniqueViolationError:
        raise CliError(f"a schedule named {args.name!r} exists already (--replace changes it)") from None
    except asyncpg.ForeignKeyViolationError:
        raise CliError("no such workspace or user") from None
    following = schedules.next_slot(added.cron, added.timezone,
                                    await conn.fetchval("select kyrie.now()"))
    print(f"schedule {added.name!r}: {added.kind} at '{added.cron}' ({added.timezone}),"
          f" next slot {when(following)}{'' if added.enabled else ' (disabled)'}")
    return 0


async def cmd_remove(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if not await schedules.remove(conn, args.name):
        raise CliError(f"no schedule named {args.name!r}")
    print(f"schedule {args.name!r} removed (jobs it already enqueued stay)")
    return 0


COMMANDS = {"list": cmd_list, "add": cmd_add, "remove": cmd_remove}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kyrie-engine schedules", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,add,remove}")
    ls = sub.add_parser("list", help="every schedule, with its last and next slot")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add = sub.add_parser("add", help="add a schedule: NAME 'CRON' KIND [--payload JSON]")
    add.add_argument("name")
    add.add_argument("cron", help="five fields: minute hour day-of-month month day-of-week")
    add.add_argument("kind")
    add.add_argument("--payload", type=_payload, default={}, metavar="JSON")
    add.add_argument("--timezone", default="UTC", help="IANA name the cron is read in (default UTC)")
    add.add_argument("--workspace", type=UUID, metavar="UUID")
    add.add_argument("--user", type=UUID, metavar="UUID")
    add.add_argument("--priority", type=int, default=0)
    add.add_argument("--disabled", action="store_true", help="add it switched off")
    add.add_argument("--replace", action="store_true", help="change the schedule of that name if it exists")
    rm = sub.add_parser("remove", help="delete a schedule")
    rm.add_argument("name")
    return p


async def _run(args: argparse.Namespace, dsn: str) -> int:
    conn = await asyncpg.connect(driver_dsn(dsn), **connect_kwargs(dsn))
    try:
        return await COMMANDS[args.command](conn, args)
    finally:
        await conn.close()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "add":
        # Refused before any connection: the checks need no database.
        try:
            schedules.check_cron(args.cron)
            schedules.check_timezone(args.timezone)
            check_kind(args.kind)
        except ValueError as exc:
            print(f"kyrie-engine schedules: {exc}", file=sys.stderr)
            return 2
    dsn = database_url_from_env()
    try:
        return asyncio.run(_run(args, dsn))
    except schedules.ScheduleError as exc:
        print(f"kyrie-engine schedules: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"kyrie-engine schedules: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"kyrie-engine schedules: cannot reach the database: {exc}", file=sys.stderr)
        return 1
