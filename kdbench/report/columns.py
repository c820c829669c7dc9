"""The leaderboard's columns as people read them: one definition shared by the terminal table, Markdown and HTML,
so every format shows the same numbers the same way (``--format json`` holds them unformatted)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdbench.report.leaderboard import LeaderboardRow, all_metrics
from kdbench.report.statistics import Interval

MISSING = "—"


@dataclass(frozen=True)
class Column:
    header: str
    text: Callable[[LeaderboardRow], str]
    field: str  # the JSON field (or field prefix) the cell shows
    numeric: bool = True
    metric: str | None = None  # set on metric columns: the terminal table bolds each student's best


def number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def interval(value: Interval | None, digits: int = 2) -> str:
    return "" if value is None else f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"


def count(value: float | None) -> str:
    """Large counts in k/M/G with three significant digits: 247.5k reads faster than 247,517."""
    if value is None:
        return MISSING
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def pair(own: float | None, total: float | None, fmt: Callable[[float | None], str]) -> str:
    return MISSING if own is None else f"{fmt(own)} / {fmt(total)}"


def metric_text(row: LeaderboardRow, metric: str) -> str:
    """``mean ± std [95% CI]``; the std and interval are left out where one training seed leaves them undefined."""
    if metric not in row.metrics_mean:
        return row.status if row.status != "ok" else MISSING
    std = row.metrics_std.get(metric)
    text = number(row.metrics_mean[metric]) + ("" if std is None else f" ± {std:.2f}")
    spread = interval(row.metrics_ci95.get(metric))
    return f"{text} {spread}" if spread else text


def task_text(row: LeaderboardRow, task: str) -> str:
    """``mean ± std`` over training seeds of the row's primary metric on ``task`` (no std from one seed)."""
    if task not in row.task_scores:
        return MISSING
    std = row.task_stds[task]
    return number(row.task_means[task]) + ("" if std is None else f" ± {std:.2f}")


def best_text(row: LeaderboardRow) -> str:
    """``best``, or whether the paired bootstrap tells the row from the best, with its p-value."""
    if row.vs_best is None:
        return MISSING
    if row.rank == 1:
        return "best"
    p_value = row.vs_best.p_value
    shown = "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"
    return f"{'yes' if row.vs_best.same_as_best else 'no'} ({shown})"


def sft_by_seed_text(row: LeaderboardRow) -> str:
    """``+0.73 [-0.25, 1.71]``: the row minus sft, seed by seed, and its interval (none from one shared seed)."""
    if row.vs_sft is None:
        return MISSING
    return f"{row.vs_sft.difference:+.2f} {interval(row.vs_sft.interval)}".strip()


def gap_text(row: LeaderboardRow) -> str:
    if row.gap_recovered is None:
        return MISSING
    spread = interval(row.gap_recovered_ci95)
    return f"{row.gap_recovered:.2f} {spread}".strip()


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


def columns(rows: Sequence[LeaderboardRow]) -> list[Column]:
    """Identity, rank, each metric, the difference to sft by seed, the significance test, gap recovered, seeds,
    costs, selection and status (the status column only when a row was not scored)."""
    metric_columns = [Column(metric, lambda row, m=metric: metric_text(row, m), f"{metric}_mean", metric=metric)
                      for metric in all_metrics(rows)]
    chosen = [
        Column("family", lambda row: row.family, "family", numeric=False),
        Column("student", lambda row: row.student, "student", numeric=False),
        Column("method", lambda row: row.method, "method", numeric=False),
        Column("rank", lambda row: MISSING if row.rank is None else str(row.rank), "rank"),
        *metric_columns,
        Column("Δ sft by seed", sft_by_seed_text, "diff_to_sft_by_seed"),
        Column("≈ best", best_text, "same_as_best", numeric=False),
        Column("gap recovered", gap_text, "gap_recovered"),
        Column("seeds (train × eval)", lambda row: f"{row.n_train_seeds} × {row.n_eval_seeds}", "n_train_seeds"),
        Column("steps (own / total)", lambda row: pair(row.optimizer_steps, row.optimizer_steps_total,
                                                       lambda v: number(v, 0)), "optimizer_steps"),
        Column("tokens (own / total)", lambda row: pair(row.train_tokens, row.train_tokens_total, count),
               "train_tokens"),
        Column("forwards (student / teacher)", lambda row: pair(row.student_forwards, row.teacher_forwards, count),
               "student_forwards"),
        Column("peak MB", lambda row: number(row.peak_memory_mb, 0), "peak_memory_mb"),
        Column("train s", lambda row: number(row.train_seconds, 1), "train_seconds"),
        Column("wall s", lambda row: number(row.wall_seconds, 1), "wall_seconds"),
        Column("selected step", lambda row: ", ".join(map(str, row.selected_steps)) or MISSING, "selected_step"),
        Column("params", lambda row: MISSING if row.params is None else f"{row.params:,}", "params"),
    ]
    if any(row.status != "ok" for row in rows):
        chosen.append(Column("status", status_text, "status", numeric=False))
    return chosen


def best_cells(rows: Sequence[LeaderboardRow], metrics: Sequence[str]) -> set[tuple[int, str]]:
    """(row index, metric) pairs holding the best student mean within each (family, student); ties share it."""
    best: set[tuple[int, str]] = set()
    groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        if not row.is_teacher and row.status == "ok":
            groups.setdefault((row.family, row.student), []).append(index)
    for indices in groups.values():
        for metric in metrics:
            scored = [i for i in indices if metric in rows[i].metrics_mean]
            if not scored:
                continue
            pick = max if all(rows[i].higher_is_better.get(metric, True) for i in scored) else min
            best_value = pick(rows[i].metrics_mean[metric] for i in scored)
            best.update((i, metric) for i in scored if rows[i].metrics_mean[metric] == best_value)
    return best
