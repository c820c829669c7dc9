"""The HTML report's figures, drawn by matplotlib (Agg) as inline SVG: no file, font or script to fetch.

Text stays text (``svg.fonttype: none``: small, selectable) and matplotlib escapes it as XML; math parsing is
off, so a ``$`` in a method name is drawn as it is instead of being read as TeX.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdbench.report.leaderboard import LeaderboardRow  # noqa: E402

_STYLE = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "kdbench", "font.size": 9,
          "axes.spines.top": False, "axes.spines.right": False}
_WIDTH, _HEIGHT = 6.4, 3.2


@contextmanager
def _figure(panels: int = 1) -> Iterator[tuple[Figure, list[Any]]]:
    with matplotlib.rc_context(_STYLE):
        figure, axes = plt.subplots(1, panels, figsize=(_WIDTH, _HEIGHT), squeeze=False, layout="constrained")
        try:
            yield figure, list(axes[0])
        finally:
            plt.close(figure)


def _svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element, without the XML prologue (it is inlined into the HTML page)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def row_label(row: LeaderboardRow, rows: Sequence[LeaderboardRow]) -> str:
    """The method, prefixed by the student when a family has several students."""
    students = {r.student for r in rows if r.family == row.family and not r.is_teacher}
    return row.method if len(students) < 2 or row.is_teacher else f"{row.student}/{row.method}"


def _error_bar(row: LeaderboardRow, metric: str) -> tuple[list[float], list[float]]:
    """Below and above the mean to the ends of its 95% interval over training seeds (none: zero length)."""
    interval = row.metrics_ci95.get(metric)
    mean = row.metrics_mean[metric]
    return ([0.0], [0.0]) if interval is None else ([mean - interval[0]], [interval[1] - mean])


def metric_by_method(rows: Sequence[LeaderboardRow], metric: str) -> str:
    """One family's rows: the metric's mean per method, error bars its 95% interval over training seeds."""
    shown = [row for row in rows if metric in row.metrics_mean]
    with _figure() as (figure, (axes,)):
        bars = [_error_bar(row, metric) for row in shown]
        errors = [[below for (below,), _ in bars], [above for _, (above,) in bars]]
        colours = ["#999999" if row.is_teacher else "#3b6ea5" for row in shown]
        axes.bar(range(len(shown)), [row.metrics_mean[metric] for row in shown], yerr=errors, color=colours,
                 capsize=4)
        axes.set_xticks(range(len(shown)), [row_label(row, rows) for row in shown], rotation=20, ha="right")
        axes.set_ylabel(f"{metric} (error bars: 95% CI over training seeds)")
        return _svg(figure)


def validation_curves(results: Sequence[dict[str, Any]]) -> str:
    """Every scored student cell's validation curve of its own stage, one colour per method, one line per training
    seed (the teacher's stage is longer and shared by every row, so it is left out)."""
    curves = [r for r in results if r["status"] == "ok" and r["kind"] == "student" and r["validation"]["curve"]]
    with _figure() as (figure, (axes,)):
        colours: dict[str, Any] = {}
        for result in sorted(curves, key=lambda r: (r["student"], r["method"], r["train_seed"])):
            label = f"{result['student']}/{result['method']}"
            first = label not in colours
            colours.setdefault(label, f"C{len(colours) % 10}")
            steps = [point["step"] for point in result["validation"]["curve"]]
            values = [point["value"] for point in result["validation"]["curve"]]
            axes.plot(steps, values, color=colours[label], marker=".", linewidth=1, label=label if first else None)
        metrics = sorted({str(r["validation"]["metric"]) for r in curves})
        axes.set_xlabel("optimizer step of the row's own stage")
        axes.set_ylabel(f"validation {', '.join(metrics)}")
        if colours:
            axes.legend(fontsize=7, loc="best")
        return _svg(figure)


def metric_against_cost(rows: Sequence[LeaderboardRow], metric: str) -> str:
    """One family's rows: the metric against its own training time and against training tokens (ancestors
    included), error bars its 95% interval over training seeds."""
    shown = [row for row in rows if metric in row.metrics_mean and not row.is_teacher]
    costs = (("train_seconds", "own stage's training seconds"), ("train_tokens_total", "training tokens, ancestors included"))
    with _figure(panels=2) as (figure, panels):
        for axes, (field, label) in zip(panels, costs):
            for index, row in enumerate(shown):
                cost = getattr(row, field)
                if cost is None:
                    continue
                axes.errorbar([cost], [row.metrics_mean[metric]], yerr=_error_bar(row, metric), fmt="o", capsize=3,
                              color=f"C{index % 10}", label=row_label(row, rows))
            axes.set_xlabel(label)
            axes.set_ylabel(metric)
        if shown:
            panels[-1].legend(fontsize=7, loc="best")
        return _svg(figure)


def student_sizes(rows: Sequence[LeaderboardRow]) -> int:
    """How many student sizes (distinct parameter counts of scored student rows) the rows hold."""
    return len({row.params for row in rows if not row.is_teacher and row.scored and row.params is not None})


def metric_against_size(rows: Sequence[LeaderboardRow], metric: str) -> str:
    """One family's rows: the metric against student parameters (log axis), one line per method through its
    students, error bars its 95% interval over training seeds; each teacher a dashed horizontal line (the papers'
    scaling figure)."""
    students = [row for row in rows if not row.is_teacher and metric in row.metrics_mean and row.params is not None]
    with _figure() as (figure, (axes,)):
        for index, method in enumerate(dict.fromkeys(row.method for row in students)):
            line = sorted((row for row in students if row.method == method), key=lambda row: int(row.params or 0))
            bars = [_error_bar(row, metric) for row in line]
            axes.errorbar([row.params for row in line], [row.metrics_mean[metric] for row in line],
                          yerr=[[below for (below,), _ in bars], [above for _, (above,) in bars]], marker="o",
                          capsize=3, color=f"C{index % 10}", label=method)
        for row in rows:
            if row.is_teacher and metric in row.metrics_mean:
                axes.axhline(row.metrics_mean[metric], color="#999999", linestyle="--", linewidth=1,
                             label=f"teacher ({row.student})")
        axes.set_xscale("log")
        axes.set_xlabel("student parameters")
        axes.set_ylabel(f"{metric} (error bars: 95% CI over training seeds)")
        if students:
            axes.legend(fontsize=7, loc="best")
        return _svg(figure)
