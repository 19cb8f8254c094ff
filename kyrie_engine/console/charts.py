"""Charts drawn on the server as inline SVG: no script, nothing fetched, readable as the page loads.

Each chart is a fixed viewBox scaled by CSS to its column; colours come from
classes in console.css, so the charts follow the page's palette.  The y axis
starts at zero and is labelled with its top value rounded up to a readable
number, the x axis with the window's first and last bucket.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 460, 140
LEFT, BOTTOM, TOP = 48, 18, 8


def _nice(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above value (a top the eye can read)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def _label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _frame(top: float, rows: Sequence[Any], unit: str, body: list[str], legend: list[tuple[str, str]],
           title: str) -> Markup:
    plot_h = HEIGHT - BOTTOM - TOP
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<title>{escape(title)}</title>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" y2="{TOP + plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH}" y2="{TOP}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP + plot_h / 2}" x2="{WIDTH}" y2="{TOP + plot_h / 2}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{_label(top)}{unit}</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h + 4}" text-anchor="end">0</text>',
    ]
    if rows:
        first: dt.datetime = rows[0]["bucket"]
        last: dt.datetime = rows[-1]["bucket"]
        fmt = "%H:%M" if (last - first) < dt.timedelta(hours=23) else "%a %H:%M"
        parts.append(f'<text class="tick" x="{LEFT}" y="{HEIGHT - 4}">{first:{fmt}}</text>')
        parts.append(
            f'<text class="tick" x="{WIDTH}" y="{HEIGHT - 4}" text-anchor="end">{last:{fmt}} UTC</text>'
        )
    parts.extend(body)
    x = LEFT + 4
    for cls, name in legend:
        parts.append(f'<rect class="{cls}" x="{x}" y="{TOP}" width="9" height="9" rx="2"/>')
        parts.append(f'<text class="legend" x="{x + 13}" y="{TOP + 8}">{escape(name)}</text>')
        x += 16 + 7 * len(name)
    parts.append("</svg>")
    # Every piece of text that is not ours (titles, names) went through escape() above.
    return Markup("".join(parts))  # noqa: S704


def stacked_bars(
    rows: Sequence[Any], series: list[tuple[str, str, str]], title: str, unit: str = ""
) -> Markup:
    """One bar per bucket, `series` (column, css class, legend) stacked bottom up."""
    totals = [sum(int(r[col] or 0) for col, _, _ in series) for r in rows]
    top = _nice(max(totals, default=0))
    plot_h = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT) / max(len(rows), 1)
    gap = 1 if step > 4 else 0
    body: list[str] = []
    for i, row in enumerate(rows):
        y = float(TOP + plot_h)
        for col, cls, _ in series:
            value = int(row[col] or 0)
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            body.append(
                f'<rect class="{cls}" x="{LEFT + i * step + gap:.1f}" y="{y:.1f}" '
                f'width="{max(step - 2 * gap, 0.5):.1f}" height="{h:.1f}">'
                f'<title>{row["bucket"]:%H:%M} {escape(col)}: {value}</title></rect>'
            )
    return _frame(top, rows, unit, body, [(cls, name) for _, cls, name in series], title)


def lines(rows: Sequence[Any], series: list[tuple[str, str, str]], title: str, unit: str = "") -> Markup:
    """One line per series over the buckets; a bucket without a value breaks the line."""
    values = [float(r[col]) for r in rows for col, _, _ in series if r[col] is not None]
    top = _nice(max(values, default=0))
    plot_h = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT) / max(len(rows), 1)
    body: list[str] = []
    for col, cls, _ in series:
        runs: list[list[str]] = [[]]
        for i, row in enumerate(rows):
            if row[col] is None:
                runs.append([])
                continue
            x = LEFT + (i + 0.5) * step
            y = TOP + plot_h - plot_h * min(float(row[col]), top) / top
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                body.append(f'<circle class="{cls}" cx="{cx}" cy="{cy}" r="2"/>')
            elif run:
                body.append(f'<polyline class="line {cls}" points="{" ".join(run)}"/>')
    return _frame(top, rows, unit, body, [(cls, name) for _, cls, name in series], title)
