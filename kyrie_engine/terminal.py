"""Plain-text tables and durations for terminals (the jobs CLI and the demo).

No colour and no dependency: the output is read in psql-like terminals, CI
logs and pasted into issues, where escape codes only get in the way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any


def age(value: dt.timedelta | None) -> str:
    """`42s`, `3m05s`, `2h10m`, `4d03h`: how long, at a glance."""
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds}s"
    if seconds < 3600:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{sign}{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def first_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """Aligned columns under a rule; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("─" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    if not rows:
        out.append("(none)")
    return "\n".join(out)
