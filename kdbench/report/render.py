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
from kdbench.report.columns import MISSING, Column, best_cells, columns, status_text
from kdbench.report.controls import ControlOutcome, control_outcomes
from kdbench.report.leaderboard import LeaderboardRow, all_metrics, leaderboard_records
from kdbench.report.statistics import method_text
from kdbench.report.tables import (
    control_caption,
    control_notes,
    control_table,
    length_table,
    published_table,
    task_caption,
    task_metric,
    task_table,
)

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


def _markdown(report: Report) -> str:
    parts = ["Protocol card:\n\n" + "".join(f"- {line}\n" for line in render_card(card).splitlines())
             for card in report.cards]
    parts += [leaderboard_markdown(report.rows), f"Statistics: {method_text()}\n"]
    task_header, task_body = task_table(report.rows)
    if task_body:
        parts.append(f"{task_caption(report.rows)}\n\n" + _md_table(task_header, task_body))
    if report.controls:
        header, body = control_table(report.controls)
        notes = "".join(f"- {note}\n" for note in control_notes(report.controls))
        parts.append(f"{control_caption(report.controls)}\n\n" + _md_table(header, body) + "\n" + notes)
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
        elif isinstance(value, dict) or (value is None and key.endswith(("_by_length", "_by_task"))):
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


def terminal_tables(rows: Sequence[LeaderboardRow], title: str, width: int | None = None) -> list[Table]:
    """What a terminal shows of a report, in order: the leaderboard, the per-task scores, the positive controls."""
    outcomes = control_outcomes(rows)
    return [rich_table(rows, title, width), *task_tables(rows, width), *([controls_table(outcomes)] if outcomes else [])]


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


def _text_table(title: str, header: Sequence[str], body: Sequence[Sequence[str]], caption: str = "",
                whole: Sequence[str] = IDENTITY, numeric: Sequence[str] | None = None) -> Table:
    """A plain terminal table: the ``whole`` columns are not wrapped at spaces, the ``numeric`` ones (by default all
    but the identity columns) are right-aligned, and a cell too wide folds onto the next line rather than losing
    characters to an ellipsis."""
    table = Table(title=title, caption=caption or None, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, title_justify="left")
    for name in header:
        right = name not in IDENTITY if numeric is None else name in numeric
        table.add_column(name, justify="right" if right else "left", no_wrap=name in whole, overflow="fold")
    for cells in body:
        table.add_row(*cells)
    return table


def task_tables(rows: Sequence[LeaderboardRow], width: int | None = None) -> list[Table]:
    """The per-task table; in a terminal of ``width`` too narrow for every task, the tasks are split over several
    tables that each fit (each with the rows' names), so no cell is cut."""
    header, body = task_table(rows)
    if not body:
        return []
    title = f"Per task ({task_metric(rows)})"
    chunks = _fitting_chunks(rows, header[3:], title, width) if width is not None else [header[3:]]
    tables = [_text_table(title if index == 0 else f"{title}, continued", *task_table(rows, chunk))
              for index, chunk in enumerate(chunks)]
    tables[-1].caption = task_caption(rows)
    return tables


def _fitting_chunks(rows: Sequence[LeaderboardRow], tasks: Sequence[str], title: str, width: int) -> list[list[str]]:
    """Consecutive groups of ``tasks`` whose tables fit ``width`` (a task too wide alone gets a table of its own)."""
    wide = Console(width=10_000)
    chunks: list[list[str]] = [[]]
    for task in tasks:
        trial = [*chunks[-1], task]
        if chunks[-1] and Measurement.get(wide, wide.options, _text_table(title, *task_table(rows, trial))).maximum > width:
            chunks.append([task])
        else:
            chunks[-1] = trial
    return chunks


def controls_table(outcomes: Sequence[ControlOutcome]) -> Table:
    """The positive controls as a terminal table; its caption says how they are judged and gives each mechanism."""
    header, body = control_table(outcomes)
    caption = control_caption(outcomes) + "\n" + "\n".join(control_notes(outcomes))
    numbers = ("better − worse by seed", "p", "seeds")  # an interval reads badly split over two lines
    return _text_table("Positive controls", header, body, caption, whole=numbers, numeric=numbers)
