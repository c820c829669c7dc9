"""The report's tables that every format shows (the per-task scores, the positive controls, exact match by gold
length, the published numbers), as a header and a body of text cells: the Markdown, terminal and HTML renderers lay
them out, each its own way."""

from __future__ import annotations

from collections.abc import Sequence

from kdbench.report.build import Report
from kdbench.report.columns import MISSING, interval, number, task_text
from kdbench.report.controls import ControlOutcome
from kdbench.report.leaderboard import LeaderboardRow, all_metrics
from kdbench.report.published import METHODS, TEACHER_COLUMN


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


def task_metric(rows: Sequence[LeaderboardRow]) -> str:
    """The metric the per-task scores are of: the rows' primary metric."""
    metrics = all_metrics(rows)
    return metrics[0] if metrics else ""


def task_caption(rows: Sequence[LeaderboardRow]) -> str:
    return (f"Per task ({task_metric(rows)}): each training seed's score on the task is the mean over its evaluation "
            "seeds on the experiment's own split; a cell is the mean ± sample standard deviation over training seeds.")


def task_table(rows: Sequence[LeaderboardRow], tasks: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and body of the per-task table: one row per leaderboard row, one column per task (``tasks``, by default
    every task a row was scored on); no body when no row has per-task scores."""
    shown = sorted({task for row in rows for task in row.task_scores}) if tasks is None else list(tasks)
    body = [[row.family, row.student, row.method, *(task_text(row, task) for task in shown)] for row in rows]
    return ["family", "student", "method", *shown], body if shown else []


def control_caption(outcomes: Sequence[ControlOutcome]) -> str:
    metric = next((o.metric for o in outcomes if o.metric), "the primary metric")
    return (f"Positive controls ({metric} on the control's task): a published mechanism predicts the first method "
            "above the second on that task. Per training seed scored by both rows, the difference of their per-task "
            "scores (each the mean over the seed's evaluation seeds), better − worse; the mean over those seeds with "
            "a 95% Student-t interval and a two-sided paired t-test. holds: the interval lies above 0; fails: below 0 "
            "(the predicted sign reversed); not separated: it holds 0; —: fewer than two shared seeds, or a row "
            "missing. Each side shows the row's own per-task mean over its scored seeds.")


def control_notes(outcomes: Sequence[ControlOutcome]) -> list[str]:
    """``[n] task: better > worse — mechanism (source)``, one per distinct control, numbered as in the table."""
    controls = list(dict.fromkeys(outcome.control for outcome in outcomes))
    return [f"[{index}] {c.label} — {c.mechanism}" + (f" ({c.source})" if c.source else "")
            for index, c in enumerate(controls, 1)]


def control_table(outcomes: Sequence[ControlOutcome]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the positive controls table, one line per control and (family, student)."""
    numbers = {control: index for index, control in enumerate(dict.fromkeys(o.control for o in outcomes), 1)}
    header = ["control", "family", "student", "better", "worse", "better − worse by seed", "p", "seeds", "result"]
    body = [[f"{o.control.label} [{numbers[o.control]}]", o.family, o.student,
             f"{o.better.method} {number(o.better.mean)}", f"{o.worse.method} {number(o.worse.mean)}",
             MISSING if o.paired is None else f"{o.paired.difference:+.2f} {interval(o.paired.interval)}".strip(),
             _p_text(None if o.paired is None else o.paired.p_value),
             MISSING if o.paired is None else str(o.paired.seeds),
             o.verdict + (f" ({o.note})" if o.note else "")] for o in outcomes]
    return header, body


def _p_text(p_value: float | None) -> str:
    if p_value is None:
        return MISSING
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"
