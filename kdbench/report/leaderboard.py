"""Leaderboards built only from the ``result.json`` files a run leaves behind.

Each cell writes ``<run_dir>/cells/<family>/<student>/<method>/seed<k>/result.json``
(``kdbench.results.schema``). Reading nothing but those files means a leaderboard can be rebuilt at
any time, from a partial run, or on another machine, without re-running anything.

Aggregation: for each (family, student, method) every metric pools its per-evaluation-seed
values across the train seeds that were scored, then reports the mean and the sample standard
deviation (ddof=1; 0.0 for a single value). Seeds that failed or diverged are not averaged in: the
row carries their status and reason instead. Rows rank by the experiment's primary metric
(``evaluation.primary_metric``, recorded in every result).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from kdbench.errors import KdbenchError
from kdbench.report.card import ProtocolCard, render_card
from kdbench.results.schema import REQUIRED_KEYS, SCHEMA_VERSION, STATUSES

RENDER_FORMATS: tuple[str, ...] = ("md", "csv", "json")
TEACHER_KIND = "teacher"
_RESULT_GLOB = "cells/**/result.json"
_MISSING = "—"
_BASE_RECORD_KEYS: tuple[str, ...] = (
    "family", "student", "method", "kind", "status", "n_seeds", "n_train_seeds", "wall_seconds", "params",
)


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Read every ``cells/**/result.json`` under ``run_dir``, sorted by path.

    Nothing is skipped silently: invalid JSON, another schema_version or a missing required key
    raises KdbenchError naming the file, so a leaderboard never quietly drops a cell.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdbenchError(
            f"Run directory {str(run_dir)!r} does not exist; expected a directory written by "
            "`kdbench run`. Run `kdbench run` first or pass the right run directory."
        )
    result_paths = sorted(run_dir.glob(_RESULT_GLOB))
    if not result_paths:
        raise KdbenchError(
            f"No results found: searched {str(run_dir / _RESULT_GLOB)!r} and found no "
            "result.json files. Run `kdbench run` first (each finished cell writes one)."
        )
    return [_read_result(path) for path in result_paths]


def _read_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KdbenchError(
            f"{str(path)!r} is not valid JSON ({error}); expected a schema_version "
            f"{SCHEMA_VERSION} result file. Delete it and re-run that cell."
        ) from error
    if not isinstance(result, dict):
        raise KdbenchError(
            f"{str(path)!r} holds a JSON {type(result).__name__}; expected a JSON object."
        )
    if result.get("schema_version") != SCHEMA_VERSION:
        raise KdbenchError(
            f"{str(path)!r} has schema_version {result.get('schema_version')!r}; expected "
            f"{SCHEMA_VERSION}. It was written by an incompatible kdbench; re-run that cell."
        )
    missing_keys = [key for key in REQUIRED_KEYS if key not in result]
    if missing_keys:
        raise KdbenchError(
            f"{str(path)!r} lacks required key(s) {missing_keys}; expected every key of "
            "kdbench.results.schema.CellResult. Delete it and re-run that cell."
        )
    if result["status"] not in STATUSES:
        raise KdbenchError(f"{str(path)!r} has status {result['status']!r}; expected one of {list(STATUSES)}.")
    if not isinstance(result["metrics"], dict) or not all(
        isinstance(per_seed, dict) for per_seed in result["metrics"].values()
    ):
        raise KdbenchError(
            f"{str(path)!r} has malformed 'metrics'; expected "
            '{"<metric>": {"<eval seed>": <value>, ...}, ...}.'
        )
    return result


@dataclass
class LeaderboardRow:
    """One (family, student, method) aggregated over its train and evaluation seeds."""

    family: str
    student: str
    method: str
    kind: str
    metrics_mean: dict[str, float]
    metrics_std: dict[str, float]
    n_seeds: int  # distinct (train seed, eval seed) pairs pooled
    n_train_seeds: int  # train seeds scored (status ok)
    wall_seconds: float | None  # mean of wall_seconds.total over train seeds
    params: int | None  # parameter count of the model this row evaluates
    config_hashes: list[str]
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    primary_metric: str | None = None  # what the row ranks by, from the experiment
    protocol: str | None = None  # uniform or paper (METHODS.md)
    optimizer_steps: float | None = None  # of the row's own training stage, mean over train seeds
    optimizer_steps_total: float | None = None  # ancestors (SFT init, teacher) included
    selected_steps: list[int] = field(default_factory=list)  # per scored train seed, in seed order
    status: str = "ok"  # ok when every train seed was scored; else the status of the first that was not
    failures: list[dict[str, Any]] = field(default_factory=list)  # per unscored seed: seed, status, reason, stage, step

    @property
    def is_teacher(self) -> bool:
        return self.kind == TEACHER_KIND


def build_leaderboard(results: list[dict[str, Any]]) -> list[LeaderboardRow]:
    """Group results by (family, student, method), pool metric values across seeds, and order.

    Order: family alphabetically; within a family the teacher row first, then by student, then by
    the primary metric best first (rows that could not be scored last).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in results:
        key = (str(result["family"]), str(result["student"]), str(result["method"]))
        groups.setdefault(key, []).append(result)
    rows = [_aggregate_group(key, group) for key, group in groups.items()]
    return sorted(rows, key=_row_sort_key)


def settings_mismatches(results: list[dict[str, Any]]) -> list[str]:
    """Families whose cells were not all run with the same shared settings (everything but the
    objective): their rows would not compare like with like. One message per such family."""
    hashes: dict[str, dict[str, list[str]]] = {}
    for result in results:
        shared = str(result.get("shared_config_hash", "unknown"))
        label = f"{result['student']}/{result['method']}/seed{result['train_seed']}"
        hashes.setdefault(str(result["family"]), {}).setdefault(shared, []).append(label)
    return [
        f"{family}: cells ran with {len(groups)} different shared settings ("
        + "; ".join(f"{h}: {', '.join(sorted(cells))}" for h, cells in sorted(groups.items())) + ")"
        for family, groups in sorted(hashes.items()) if len(groups) > 1
    ]


def _aggregate_group(key: tuple[str, str, str], group: list[dict[str, Any]]) -> LeaderboardRow:
    family, student, method = key
    pooled_values: dict[str, list[float]] = {}
    seed_pairs: set[tuple[str, str]] = set()
    higher_is_better: dict[str, bool] = {}
    scored = [result for result in group if result["status"] == "ok"]
    failures = [{"seed": r["train_seed"], "status": r["status"], **r.get("failure", {})}
                for r in group if r["status"] != "ok"]
    for failure in failures:
        failure.pop("traceback", None)
    primary = str(group[0]["primary_metric"])
    for result in scored:
        train_seed = str(result["train_seed"])
        for metric, per_eval_seed in result["metrics"].items():
            for eval_seed, value in per_eval_seed.items():
                pooled_values.setdefault(metric, []).append(float(value))
                if metric == primary:  # extra columns (other sets, lm-eval) may be scored under other seeds
                    seed_pairs.add((train_seed, str(eval_seed)))
        for metric, is_higher_better in (result.get("higher_is_better") or {}).items():
            higher_is_better.setdefault(metric, bool(is_higher_better))

    metrics_mean = {metric: statistics.fmean(values) for metric, values in pooled_values.items()}
    metrics_std = {
        metric: statistics.stdev(values) if len(values) > 1 else 0.0
        for metric, values in pooled_values.items()
    }
    wall_totals = [float(result["wall_seconds"]["total"]) for result in scored]
    kind = str(group[0]["kind"])
    return LeaderboardRow(
        family=family,
        student=student,
        method=method,
        kind=kind,
        metrics_mean=dict(sorted(metrics_mean.items())),
        metrics_std=dict(sorted(metrics_std.items())),
        n_seeds=len(seed_pairs),
        n_train_seeds=len({str(result["train_seed"]) for result in scored}),
        wall_seconds=statistics.fmean(wall_totals) if wall_totals else None,
        params=_model_params(scored[0] if scored else group[0], kind),
        config_hashes=sorted({str(r["config_hash"]) for r in group}),
        higher_is_better=higher_is_better,
        primary_metric=primary,
        protocol=group[0].get("protocol"),
        optimizer_steps=_mean_or_none([r["optimizer_steps"] for r in scored]),
        optimizer_steps_total=_mean_or_none([r["optimizer_steps_total"] for r in scored]),
        selected_steps=[int(r["selected_step"]) for r in sorted(scored, key=lambda r: r["train_seed"])],
        status=failures[0]["status"] if failures else "ok",
        failures=failures,
    )


def _mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _model_params(result: Mapping[str, Any], kind: str) -> int | None:
    params = result.get("params") or {}
    # A teacher row evaluates the teacher, so its own size is the teacher's count.
    preferred = ("teacher", "student") if kind == TEACHER_KIND else ("student",)
    for role in preferred:
        if params.get(role) is not None:
            return int(params[role])
    return None


def _row_sort_key(row: LeaderboardRow) -> tuple[str, int, str, int, float, str]:
    metric = row.primary_metric
    if row.status != "ok" or metric not in row.metrics_mean:
        ranking = float("inf")  # rows that could not be scored sink to the bottom of their student
    else:
        mean = row.metrics_mean[metric]
        ranking = -mean if row.higher_is_better.get(metric, True) else mean
    return (row.family, 0 if row.is_teacher else 1, row.student, int(row.status != "ok"), ranking, row.method)


def _all_metrics(rows: Sequence[LeaderboardRow]) -> list[str]:
    # Union over rows so every record/column set is the same even if a metric is missing somewhere.
    # The primary metric leads, the rest follow alphabetically.
    primaries = [row.primary_metric for row in rows if row.primary_metric]
    primary = max(set(primaries), key=primaries.count) if primaries else None
    return sorted({metric for row in rows for metric in row.metrics_mean}, key=lambda m: (m != primary, m))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def leaderboard_records(rows: Sequence[LeaderboardRow]) -> list[dict[str, Any]]:
    """One flat dict per row: identity, seed counts, wall seconds, params, ``<m>_mean``/``<m>_std``.

    Floats are rounded to 4 decimals; a metric a row lacks is None, so all records share keys.
    """
    metrics = _all_metrics(rows)
    records: list[dict[str, Any]] = []
    for row in rows:
        base_values = (
            row.family, row.student, row.method, row.kind, row.status, row.n_seeds, row.n_train_seeds,
            _round(row.wall_seconds), row.params,
        )
        record: dict[str, Any] = dict(zip(_BASE_RECORD_KEYS, base_values))
        record["primary_metric"] = row.primary_metric
        record["protocol"] = row.protocol
        record["optimizer_steps"] = _round(row.optimizer_steps)
        record["optimizer_steps_total"] = _round(row.optimizer_steps_total)
        record["selected_step"] = row.selected_steps
        record["failures"] = row.failures
        for metric in metrics:
            record[f"{metric}_mean"] = _round(row.metrics_mean.get(metric))
            record[f"{metric}_std"] = _round(row.metrics_std.get(metric))
        records.append(record)
    return records


def status_text(row: LeaderboardRow) -> str:
    """``ok``, or why seeds of the row were not scored: ``diverged (seed 0, step 2, gpt2/s1/kd/seed0: train):
    loss became nan …``."""
    if row.status == "ok":
        return "ok"
    parts = []
    for failure in row.failures:
        where = ", ".join(str(p) for p in (f"seed {failure['seed']}",
                                            f"step {failure['step']}" if failure.get("step") else None,
                                            failure.get("stage")) if p)
        parts.append(f"{failure['status']} ({where}): {failure.get('reason', '')}")
    return "; ".join(parts)


def _mean_pm_std(row: LeaderboardRow, metric: str) -> str:
    if metric not in row.metrics_mean:
        return row.status if row.status != "ok" else _MISSING
    return f"{row.metrics_mean[metric]:.2f} ± {row.metrics_std[metric]:.2f}"


def _format_wall(seconds: float | None) -> str:
    return _MISSING if seconds is None else f"{seconds:.1f}"


def _format_steps(steps: float | None) -> str:
    return _MISSING if steps is None else f"{steps:,.0f}"


def _format_selected(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if steps else _MISSING


def _format_params(params: int | None) -> str:
    return _MISSING if params is None else f"{params:,}"


def _render_markdown(rows: Sequence[LeaderboardRow]) -> str:
    metrics = _all_metrics(rows)
    header = ["family", "student", "method", "kind", *metrics, "seeds", "train seeds", "steps", "steps total",
              "selected step", "wall s", "params", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [
            row.family,
            row.student,
            row.method,
            row.kind,
            *(_mean_pm_std(row, metric) for metric in metrics),
            str(row.n_seeds),
            str(row.n_train_seeds),
            _format_steps(row.optimizer_steps),
            _format_steps(row.optimizer_steps_total),
            _format_selected(row.selected_steps),
            _format_wall(row.wall_seconds),
            _format_params(row.params),
            status_text(row),
        ]
        # A literal pipe would split the cell in GitHub Markdown.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _render_csv(rows: Sequence[LeaderboardRow]) -> str:
    # One line per row: the failures become the status text.
    records = [{**record, "failures": status_text(row) if row.failures else ""}
               for record, row in zip(leaderboard_records(rows), rows)]
    buffer = io.StringIO()
    fieldnames = list(records[0]) if records else list(_BASE_RECORD_KEYS)
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def render(rows: Sequence[LeaderboardRow], fmt: str, cards: Sequence[ProtocolCard] = ()) -> str:
    """Render rows as ``md`` (the protocol cards, then a GitHub table with ``mean ± std`` cells), ``csv`` or
    ``json`` (rows only: each carries its ``protocol``)."""
    if fmt == "json":
        return json.dumps(leaderboard_records(rows), indent=2)
    if fmt == "csv":
        return _render_csv(rows)
    if fmt == "md":
        preamble = "".join("Protocol card:\n\n" + "".join(f"- {line}\n" for line in render_card(card).splitlines())
                           + "\n" for card in cards)
        return preamble + _render_markdown(rows)
    raise KdbenchError(
        f"Unknown leaderboard format {fmt!r}; expected one of {', '.join(RENDER_FORMATS)}."
    )


def _best_methods(rows: Sequence[LeaderboardRow], metrics: Sequence[str]) -> set[tuple[int, str]]:
    """(row index, metric) pairs holding the best student score within each (family, student)."""
    best: set[tuple[int, str]] = set()
    student_groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        if not row.is_teacher and row.status == "ok":
            student_groups.setdefault((row.family, row.student), []).append(index)
    for indices in student_groups.values():
        for metric in metrics:
            scored = [i for i in indices if metric in rows[i].metrics_mean]
            if not scored:
                continue
            higher_is_better = all(rows[i].higher_is_better.get(metric, True) for i in scored)
            pick = max if higher_is_better else min
            best_value = pick(rows[i].metrics_mean[metric] for i in scored)
            # Ties share the bold: both methods are equally best on the reported mean.
            best.update((i, metric) for i in scored if rows[i].metrics_mean[metric] == best_value)
    return best


def rich_table(rows: Sequence[LeaderboardRow], title: str) -> Table:
    """A terminal table: teacher rows dim/italic, each student's best method bold per metric."""
    metrics = _all_metrics(rows)
    table = Table(title=title)
    table.add_column("family")
    table.add_column("student")
    table.add_column("method")
    for metric in metrics:
        table.add_column(metric, justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("steps total", justify="right")
    table.add_column("selected", justify="right")
    table.add_column("wall s", justify="right")
    unscored = any(row.status != "ok" for row in rows)
    if unscored:
        table.add_column("status")

    best = _best_methods(rows, metrics)
    for index, row in enumerate(rows):
        metric_cells = [
            Text(_mean_pm_std(row, metric), style="bold" if (index, metric) in best else "")
            for metric in metrics
        ]
        table.add_row(
            row.family,
            row.student,
            row.method,
            *metric_cells,
            str(row.n_seeds),
            _format_steps(row.optimizer_steps),
            _format_steps(row.optimizer_steps_total),
            _format_selected(row.selected_steps),
            _format_wall(row.wall_seconds),
            *([Text(status_text(row), style="red" if row.status != "ok" else "")] if unscored else []),
            style="dim italic" if row.is_teacher else None,
        )
    return table
