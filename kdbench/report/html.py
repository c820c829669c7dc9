"""One self-contained HTML page: the protocol card, the leaderboard, the positive controls, per-family figures
(inline SVG), per-task scores and sampled responses.

The page loads nothing at view time and runs no script (its Content-Security-Policy forbids both). Every string
that comes from a model, a data set or a config is escaped by Jinja's autoescaping; the only markup inserted
as it is comes from matplotlib, which escapes the text it draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from kdbench.report import plots
from kdbench.report.build import Report
from kdbench.report.card import CARD_FIELDS
from kdbench.report.columns import columns
from kdbench.report.folder import cell_id, load_samples
from kdbench.report.leaderboard import LeaderboardRow, all_metrics
from kdbench.report.statistics import method_text
from kdbench.report.tables import (
    control_caption,
    control_notes,
    control_table,
    length_table,
    published_table,
    task_caption,
    task_table,
)

SAMPLES_PER_ROW = 3
_TEMPLATES = Path(__file__).with_name("templates")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: Report) -> str:
    rows = report.rows
    metrics = all_metrics(rows)
    metric = metrics[0] if metrics else ""
    chosen = columns(rows)
    lengths_header, lengths_body = length_table(rows)
    published_header, published_body = published_table(report)
    controls_header, controls_body = control_table(report.controls)
    return _environment().get_template("report.html.j2").render(
        title=report.title,
        folder=str(report.folder.path),
        warnings=report.warnings,
        cards=[[(name, card[name]) for name in CARD_FIELDS if name in card] for card in report.cards],
        leaderboard={"headers": [c.header for c in chosen],
                     "rows": [{"key": "/".join(row.key), "teacher": row.is_teacher,
                               "cells": [{"text": c.text(row), "field": c.field, "numeric": c.numeric}
                                         for c in chosen]} for row in rows]},
        statistics=method_text(),
        controls={"header": controls_header, "body": controls_body, "caption": control_caption(report.controls),
                  "notes": control_notes(report.controls)},
        task_caption=task_caption(rows),
        lengths={"header": lengths_header, "body": lengths_body},
        published={"header": published_header, "body": published_body,
                   "sources": sorted({f"{m.table.source}; protocol: {m.table.protocol}" for m in report.published})},
        families=[_family(report, family, metric) for family in sorted({row.family for row in rows})],
        samples_per_row=SAMPLES_PER_ROW,
    )


def _family(report: Report, family: str, metric: str) -> dict[str, Any]:
    rows = [row for row in report.rows if row.family == family]
    results = [r for r in report.folder.results if r["family"] == family]
    return {
        "name": family,
        "metric": metric,
        "by_method": Markup(plots.metric_by_method(rows, metric)),
        "by_cost": Markup(plots.metric_against_cost(rows, metric)),
        "curves": Markup(plots.validation_curves(results)),
        "by_size": Markup(plots.metric_against_size(rows, metric)) if plots.student_sizes(rows) > 1 else None,
        "tasks": dict(zip(("header", "body"), task_table(rows))),
        "samples": [_samples(report, row, results) for row in rows],
    }


def _scored(results: Sequence[dict[str, Any]], row: LeaderboardRow) -> list[dict[str, Any]]:
    """The row's scored cells, by training seed."""
    cells = (r for r in results if r["status"] == "ok" and cell_id(r)[:3] == row.key)
    return sorted(cells, key=lambda r: r["train_seed"])


def _samples(report: Report, row: LeaderboardRow, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = _scored(results, row)
    items = load_samples(report.folder.cell_path(scored[0]) / "samples.json")[:SAMPLES_PER_ROW] if scored else []
    label = f"{row.student}/{row.method}" + (f" (training seed {scored[0]['train_seed']})" if scored else "")
    return {"label": label, "entries": [{key: str(item.get(key, "")) for key in ("prompt", "response", "reference")}
                                      for item in items]}
