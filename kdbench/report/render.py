"""A report as text: a terminal table, Markdown, CSV, JSON (rows as data) or one self-contained HTML page."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from kdbench.errors import KdbenchError
from kdbench.report.build import Report
from kdbench.report.card import render_card
from kdbench.report.columns import MISSING, Column, best_cells, columns, number, status_text
from kdbench.report.leaderboard import LeaderboardRow, all_metrics, leaderboard_records
from kdbench.report.published import METHODS, TEACHER_COLUMN
from kdbench.report.statistics import method_text

RENDER_FORMATS: tuple[str, ...] = ("md", "csv", "json", "html")


def render(report: Report, fmt: str) -> str:
    """``md`` (protocol cards, the leaderboard, how its statistics are computed, length buckets, published
    numbers), ``csv`` and ``json`` (rows only: each carries its ``protocol``), or ``html`` (one page)."""
    if fmt == "json":
        return json.dumps(leaderboard_records(report.rows), indent=2)
    if fmt == "csv":
        return _csv(report.rows)
    if fmt == "md":
        return _markdown(report)
    if fmt == "html":
        from kdbench.report.html import render_html

        return render_html(report)
    raise KdbenchError(f"Unknown leaderboard format {fmt!r}; expected one of {', '.join(RENDER_FORMATS)}.")


# -- Markdown --------------------------------------------------------------------------------------------

def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    # A literal pipe or line break would split the cell in GitHub Markdown.
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, body)]) + "\n"


def leaderboard_markdown(rows: Sequence[LeaderboardRow]) -> str:
    chosen = columns(rows)
    return _md_table([c.header for c in chosen], [[c.text(row) for c in chosen] for row in rows])


def length_table(rows: Sequence[LeaderboardRow]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the exact-match-by-gold-length table (rows with per-example scores only)."""
    shown = [row for row in rows if row.length_scores]
    buckets = list(shown[0].length_scores) if shown else []
    body = [[row.family, row.student, row.method,
             *(f"{number(row.length_scores[b])} (n={row.length_counts[b]})" for b in buckets)] for row in shown]
    return ["family", "student", "method", *(f"{b} words" for b in buckets)], body


def published_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Each published row and, under it, this folder's reproduction of it (kept apart from the leaderboard)."""
    header = ["numbers", "pair / column", *METHODS, TEACHER_COLUMN]
    body: list[list[str]] = []
    for match in report.published:
        reproduced = match.reproduced(report.rows)
        body.append([f"published ({match.table.source})", match.published.pair,
                     *(number(match.published.scores.get(name), 1) for name in (*METHODS, TEACHER_COLUMN))])
        body.append([f"reproduced here (protocol {report.rows[0].protocol})",
                     f"{match.published.family}/{match.published.student}, {match.column}",
                     *(number(reproduced[name], 1) for name in (*METHODS, TEACHER_COLUMN))])
    return header, body


def _markdown(report: Report) -> str:
    parts = ["Protocol card:\n\n" + "".join(f"- {line}\n" for line in render_card(card).splitlines())
             for card in report.cards]
    parts += [leaderboard_markdown(report.rows), f"Statistics: {method_text()}\n"]
    length_header, length_body = length_table(report.rows)
    if length_body:
        parts.append("Exact match by gold-response length:\n\n" + _md_table(length_header, length_body))
    if report.published:
        header, body = published_table(report)
        protocols = "; ".join(sorted({f"{m.table.source}: {m.table.protocol}" for m in report.published}))
        parts.append(f"Published numbers (measured elsewhere, not by this run; {protocols}):\n\n"
                     + _md_table(header, body))
    return "\n".join(parts)


# -- CSV -------------------------------------------------------------------------------------------------

def _csv_fields(record: dict[str, Any]) -> dict[str, Any]:
    """One cell per value: an interval becomes ``_low``/``_high``, a mapping ``<key>/<name>``, other lists ``;``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key.endswith("_ci95"):
            low, high = value if value is not None else (None, None)
            flat.update({f"{key}_low": low, f"{key}_high": high})
        elif isinstance(value, dict) or (value is None and key.endswith("_by_length")):
            flat.update({f"{key}/{name}": v for name, v in (value or {}).items()})
        elif isinstance(value, list):
            flat[key] = ";".join(map(str, value))
        else:
            flat[key] = value
    return flat


def _csv(rows: Sequence[LeaderboardRow]) -> str:
    # One line per row: the failures become the status text.
    records = [_csv_fields({**record, "failures": status_text(row) if row.failures else ""})
               for record, row in zip(leaderboard_records(rows), rows)]
    fieldnames = list(dict.fromkeys(name for record in records for name in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


# -- the terminal ----------------------------------------------------------------------------------------

# What a terminal too narrow for every column leaves out first (the files --format writes keep them all). Identity,
# the primary metric, the comparisons, seeds and steps stay: a row is not read without its protocol's cost.
TERMINAL_LEFT_OUT_FIRST = ("params", "peak MB", "train s", "wall s", "forwards (student / teacher)",
                           "tokens (own / total)", "gap recovered", "selected step")
IDENTITY = ("family", "student", "method")


def rich_table(rows: Sequence[LeaderboardRow], title: str, width: int | None = None) -> Table:
    """A terminal table: teacher rows dim/italic, each student's best method bold per metric. Given the terminal's
    ``width``, columns are left out (TERMINAL_LEFT_OUT_FIRST, then metrics other than the primary) until the rest fit
    without wrapping a cell, and the caption names them."""
    chosen = columns(rows)
    left_out: list[str] = []
    if width is not None:
        primary = next((column.metric for column in chosen if column.metric), None)
        optional = [*TERMINAL_LEFT_OUT_FIRST, *(c.header for c in chosen if c.metric and c.metric != primary)]
        wide = Console(width=10_000)
        for header in optional:
            if Measurement.get(wide, wide.options, _table(rows, chosen, title, "")).maximum <= width:
                break
            if any(column.header == header for column in chosen):
                chosen = [column for column in chosen if column.header != header]
                left_out.append(header)
    caption = f"Statistics: {method_text()}"
    if left_out:
        caption += (f"\nLeft out at this terminal's width ({width} characters): {', '.join(left_out)}. "
                    "`kdbench report DIR --format md|csv|json|html` writes every column.")
    return _table(rows, chosen, title, caption)


def _table(rows: Sequence[LeaderboardRow], chosen: Sequence[Column], title: str, caption: str) -> Table:
    # No vertical rules: a narrow terminal's width goes to the numbers.
    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for column in chosen:
        # Names stay whole; in a terminal too narrow even for the columns kept, a cell folds rather than losing
        # digits to an ellipsis.
        table.add_column(column.header, justify="right" if column.numeric else "left", no_wrap=column.field in IDENTITY,
                         overflow="fold")
    best = best_cells(rows, all_metrics(rows))
    for index, row in enumerate(rows):
        cells = []
        for column in chosen:
            style = "bold" if column.metric and (index, column.metric) in best else ""
            if column.field == "status" and row.status != "ok":
                style = "red"
            cells.append(Text(column.text(row) or MISSING, style=style))
        table.add_row(*cells, style="dim italic" if row.is_teacher else None)
    return table
