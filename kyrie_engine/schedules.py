"""Schedules: periodic jobs kept in `kyrie.schedules`, enqueued by every worker.

The split (20261201000501_schedules.sql): this module reads cron expressions
with cronsim and works out which slot of each schedule is due by the
database's clock (`kyrie.now()`); `kyrie.enqueue_schedule_slot` decides,
under the schedule's row lock, whether that slot is still new.  So every
Worker runs `run()` beside its claim loop, without a leader, and each slot
becomes one job whatever the number of workers.

Due means: the latest slot at or before now, after the schedule's last slot
enqueued and after it was created or last switched on (`enabled_at`).
After a downtime that is the latest missed slot, alone: a report due every
hour that missed five does not run five times in a row when the workers
come back.  A paused schedule switched on again skips the slots it was off
for: a pause is a decision, a downtime is not.  The job's `run_at` is the
slot.

cronsim rather than croniter: no dependencies of its own, five-field
expressions with the usual extensions (L, W, #), and local times that
follow the zone across DST changes (it is what healthchecks.io evaluates
every check with).  Expressions with six fields, which it would read as
seconds, are refused here: a schedule's slots are minutes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from cronsim import CronSim, CronSimError

from kyrie_engine.outages import TRANSIENT_ERRORS, Outage, describe
from kyrie_engine.queue import Executor, _payload_json, check_kind

__all__ = [
    "POLL_SECONDS",
    "Schedule",
    "ScheduleError",
    "add",
    "check_cron",
    "check_timezone",
    "due_slot",
    "list_schedules",
    "next_slot",
    "remove",
    "run",
    "tick",
]

log = logging.getLogger(__name__)

# How often a worker re-reads the schedules when no slot falls sooner: the
# delay before a schedule added or edited from psql is seen.
POLL_SECONDS = 15.0
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


class ScheduleError(ValueError):
    """A schedule the table would refuse, said in words."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A row of `kyrie.schedules`."""

    id: int
    name: str
    cron: str
    timezone: str
    kind: str
    payload: dict[str, Any]
    workspace_id: UUID | None
    user_id: UUID | None
    priority: int
    enabled: bool
    last_slot: dt.datetime | None
    next_run_at: dt.datetime | None
    created_at: dt.datetime
    enabled_at: dt.datetime

    @property
    def due_after(self) -> dt.datetime:
        """Slots at or before this are not due (kyrie.enqueue_schedule_slot's rule)."""
        return max(self.last_slot, self.enabled_at) if self.last_slot else self.enabled_at

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Schedule:
        return cls(**{**dict(row), "payload": json.loads(row["payload"])})


# ---------------------------------------------------------------------------
# checks and slots (pure)


def check_cron(cron: str) -> str:
    """`cron` normalised (single spaces), or ScheduleError saying what is wrong."""
    fields = cron.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"invalid cron expression {cron!r}: five fields are needed (minute hour day-of-month month "
            f"day-of-week, e.g. '0 7 * * 1'), it has {len(fields)}"
        )
    normal = " ".join(fields)
    try:
        CronSim(normal, dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    except CronSimError as exc:
        raise ScheduleError(f"invalid cron expression {cron!r}: {exc}") from None
    return normal


def check_timezone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r} (an IANA name, e.g. 'UTC' or 'Europe/Paris')"
        ) from None


def due_slot(cron: str, timezone: str, now: dt.datetime, after: dt.datetime) -> dt.datetime | None:
    """The latest slot at or before `now` and after `after`, or None."""
    zone = zoneinfo.ZoneInfo(timezone)
    # cronsim's reverse iteration starts strictly before its start: a
    # microsecond later makes a slot falling exactly on `now` count.
    start = (now + dt.timedelta(microseconds=1)).astimezone(zone)
    slot: dt.datetime = next(CronSim(cron, start, reverse=True))
    return slot if slot > after else None


def next_slot(cron: str, timezone: str, now: dt.datetime) -> dt.datetime:
    """The first slot after `now`."""
    slot: dt.datetime = next(CronSim(cron, now.astimezone(zoneinfo.ZoneInfo(timezone))))
    return slot


# ---------------------------------------------------------------------------
# operators (the CLI, embedding programs; psql does the same with SQL)

_SELECT = """
select id, name, cron, timezone, kind, payload::text as payload, workspace_id, user_id, priority,
       enabled, last_slot, next_run_at, created_at, enabled_at
from kyrie.schedules
"""


async def list_schedules(executor: Executor, *, enabled_only: bool = False) -> list[Schedule]:
    rows = await executor.fetch(_SELECT + (" where enabled" if enabled_only else "") + " order by name")
    return [Schedule.from_record(r) for r in rows]


async def add(
    executor: Executor,
    name: str,
    cron: str,
    kind: str,
    payload: Mapping[str, Any] | None = None,
    *,
    timezone: str = "UTC",
    workspace_id: UUID | None = None,
    user_id: UUID | None = None,
    priority: int = 0,
    enabled: bool = True,
    replace: bool = False,
) -> Schedule:
    """Add a schedule (or, with `replace`, change the one of that name).
    ScheduleError for a bad name, cron expression, time zone or kind, before
    anything is sent."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ScheduleError(
            f"invalid schedule name {name!r}: 1 to 100 characters, letters, digits, '_', '.', ':' or '-'"
        )
    cron = check_cron(cron)
    check_timezone(timezone)
    try:
        check_kind(kind)
    except (TypeError, ValueError) as exc:
        raise ScheduleError(str(exc)) from None
    payload_json = _payload_json(payload or {})
    conflict = (
        " on conflict (name) do update set cron = excluded.cron, timezone = excluded.timezone,"
        " kind = excluded.kind, payload = excluded.payload, workspace_id = excluded.workspace_id,"
        " user_id = excluded.user_id, priority = excluded.priority, enabled = excluded.enabled,"
        " updated_at = kyrie.now()"
        if replace else ""
    )
    row = await executor.fetchrow(
        "insert into kyrie.schedules (name, cron, timezone, kind, payload, workspace_id, user_id, priority,"
        " enabled) values ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9)" + conflict
        + " returning id, name, cron, timezone, kind, payload::text as payload, workspace_id, user_id,"
        " priority, enabled, last_slot, next_run_at, created_at, enabled_at",
        name, cron, timezone, kind, payload_json, workspace_id, user_id, priority, enabled,
    )
    assert row is not None
    return Schedule.from_record(row)


async def remove(executor: Executor, name: str) -> bool:
    """Delete a schedule; False when there was none of that name.  Jobs it
    already enqueued stay (cancel them with `kyrie-engine jobs cancel`)."""
    return await executor.fetchval("delete from kyrie.schedules where name = $1 returning true", name) is True


# ---------------------------------------------------------------------------
# the worker's side


@dataclass(slots=True)
class Pass:
    """What one pass over the schedules did."""

    enqueued: list[UUID]
    next_at: dt.datetime | None  # the soonest slot of any schedule, by the database's clock
    now: dt.datetime


class _Skipped:
    """Remembers the rows already reported as unreadable, so a bad row written
    from psql is logged once per worker, not once a pass."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, str, str]] = set()

    def report(self, schedule: Schedule, reason: str) -> None:
        key = (schedule.id, schedule.cron, schedule.timezone)
        if key not in self._seen:
            self._seen.add(key)
            log.error("schedule %r skipped: %s", schedule.name, reason)


async def tick(executor: Executor, skipped: _Skipped | None = None) -> Pass:
    """One pass: enqueue the due slot of each enabled schedule, if still new."""
    now: dt.datetime = await executor.fetchval("select kyrie.now()")
    enqueued: list[UUID] = []
    soonest: dt.datetime | None = None
    for schedule in await list_schedules(executor, enabled_only=True):
        try:
            check_cron(schedule.cron)
            slot = due_slot(schedule.cron, schedule.timezone, now, schedule.due_after)
            following = next_slot(schedule.cron, schedule.timezone, now)
        except (ScheduleError, CronSimError, zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            (skipped or _Skipped()).report(schedule, str(exc))
            continue
        if slot is not None:
            job = await executor.fetchval(
                "select kyrie.enqueue_schedule_slot($1, $2, $3, $4, $5)",
                schedule.id, schedule.cron, schedule.timezone, slot, following,
            )
            if job is not None:
                enqueued.append(job)
                log.info("schedule %r: slot %s enqueued as job %s", schedule.name, slot.isoformat(), job)
        elif schedule.next_run_at != following:
            await executor.execute("select kyrie.note_schedule_next($1, $2, $3, $4)",
                                   schedule.id, schedule.cron, schedule.timezone, following)
        soonest = following if soonest is None else min(soonest, following)
    return Pass(enqueued, soonest, now)


async def run(
    executor: Executor, *, poll_seconds: float = POLL_SECONDS, outage: Outage | None = None
) -> None:
    """Pass after pass, forever (a worker's side loop, stopped by cancellation):
    each pass sleeps until the soonest slot by the database's clock, at most
    `poll_seconds` (so an added or edited schedule is seen within that).
    Errors are logged and retried: a schedule must never stop a worker."""
    skipped = _Skipped()
    while True:
        delay = poll_seconds
        try:
            done = await tick(executor, skipped)
        except TRANSIENT_ERRORS as exc:
            if outage is not None:
                outage.failed(exc, "enqueuing scheduled jobs")
            else:
                log.warning("schedules: pass failed (%s); trying again later", describe(exc))
            delay = min(poll_seconds, 1.0)
        except Exception as exc:  # a bug, loudly; but schedules must never stop a worker
            log.error("schedules: pass failed (%s); trying again later", describe(exc), exc_info=exc)
        else:
            if outage is not None:
                outage.ok()
            if done.next_at is not None:
                # A few milliseconds past the slot, jittered, so a fleet does
                # not queue on the schedule's row lock all at the same instant.
                until = (done.next_at - done.now).total_seconds() + random.uniform(0.005, 0.05)  # noqa: S311
                delay = max(0.0, min(delay, until))
        await asyncio.sleep(delay)
