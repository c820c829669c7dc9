"""Leaderboard rows built only from the files a run leaves behind (``kdbench.report.folder``).

Aggregation, per (family, student, method): each training seed's score on a metric is the mean over its
evaluation seeds; the row reports the mean, sample standard deviation and Student-t 95% interval over the
training seeds that were scored (``kdbench.report.statistics``), and its difference to the sft row of its
(family, student) seed by seed. Seeds that failed or diverged are not averaged in: the row carries their status
and reason instead. Rows rank by the experiment's primary metric
(``evaluation.primary_metric``, recorded in every result) within their (family, student); with per-example
scores (``examples.json``) each row is also tested against the best of its (family, student) by a paired
bootstrap over test examples, and gets the share of the teacher–SFT gap it recovers and its exact match by
gold-response length.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdbench.report import statistics as stats
from kdbench.report.folder import CellId, cell_id
from kdbench.results.schema import CellExamples, ControlRecord

TEACHER_KIND = "teacher"
BASELINE_METHOD = "sft"  # the row the gap recovered is measured from (docs/objectives.md, "sft": every paper's baseline)
LENGTH_METRIC = "exact_match"  # what the length buckets report, as DPKD does
RowKey = tuple[str, str, str]  # family, student, method


@dataclass(frozen=True)
class ExampleVector:
    """A row's per-example scores on one metric, averaged over its training and evaluation seeds."""

    fingerprint: str  # of the examples: rows are paired only when it is equal
    values: np.ndarray
    gold_words: list[int]


@dataclass
class LeaderboardRow:
    """One (family, student, method) aggregated over its train and evaluation seeds."""

    family: str
    student: str
    method: str
    kind: str
    metrics_mean: dict[str, float]  # mean over train seeds of each seed's mean over evaluation seeds
    metrics_std: dict[str, float | None]  # sample std over train seeds; None from one train seed
    n_seeds: int  # distinct (train seed, eval seed) pairs scored on the primary metric
    n_train_seeds: int  # train seeds scored (status ok)
    wall_seconds: float | None  # mean of wall_seconds.total over train seeds
    params: int | None  # parameter count of the model this row evaluates
    config_hashes: list[str]
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    primary_metric: str | None = None  # what the row ranks by, from the experiment
    protocol: str | None = None  # uniform or paper (docs/protocols.md)
    optimizer_steps: float | None = None  # of the row's own training stage, mean over train seeds
    optimizer_steps_total: float | None = None  # ancestors (SFT init, teacher) included
    selected_steps: list[int] = field(default_factory=list)  # per scored train seed, in seed order
    status: str = "ok"  # ok when every train seed was scored; else the status of the first that was not
    failures: list[dict[str, Any]] = field(default_factory=list)  # per unscored seed: seed, status, reason, stage, step
    metrics_ci95: dict[str, stats.Interval | None] = field(default_factory=dict)  # t interval over train seeds
    n_eval_seeds: int = 0  # evaluation seeds of the primary metric
    train_tokens: float | None = None  # tokens the own stage trained on, mean over train seeds
    train_tokens_total: float | None = None  # ancestors' training included
    train_seconds: float | None = None  # the own stage's training time, mean over train seeds
    student_forwards: float | None = None  # during the own stage, mean over train seeds
    teacher_forwards: float | None = None
    peak_memory_mb: float | None = None  # the largest over train seeds
    rank: int | None = None  # by the primary metric within the (family, student); ties share a rank
    seed_scores: dict[int, float] = field(default_factory=dict)  # primary metric per scored train seed
    vs_sft: stats.SeedPaired | None = None  # against the sft row of the (family, student), seed by seed
    vs_best: stats.Comparison | None = None  # paired bootstrap against the best row of the (family, student)
    gap_recovered: float | None = None
    gap_recovered_ci95: stats.Interval | None = None
    n_examples: int | None = None  # test examples behind the per-example statistics
    length_scores: dict[str, float | None] = field(default_factory=dict)  # LENGTH_METRIC by gold length bucket
    length_counts: dict[str, int] = field(default_factory=dict)
    # Task → train seed → the primary metric on that task (own split, mean over the seed's evaluation seeds).
    task_scores: dict[str, dict[int, float]] = field(default_factory=dict)
    controls: list[ControlRecord] = field(default_factory=list)  # the positive controls its cells' results declare

    @property
    def task_means(self) -> dict[str, float]:
        """Task → the primary metric on it, mean over the scored training seeds."""
        return {task: statistics.fmean(by_seed.values()) for task, by_seed in self.task_scores.items()}

    @property
    def task_stds(self) -> dict[str, float | None]:
        """Task → sample standard deviation over training seeds; None from one seed."""
        return {task: stats.sample_std(list(by_seed.values())) for task, by_seed in self.task_scores.items()}

    @property
    def is_teacher(self) -> bool:
        return self.kind == TEACHER_KIND

    @property
    def key(self) -> RowKey:
        return self.family, self.student, self.method

    @property
    def scored(self) -> bool:
        return self.status == "ok" and self.primary_metric in self.metrics_mean


def build_leaderboard(results: list[dict[str, Any]],
                      examples: Mapping[CellId, CellExamples] | None = None) -> list[LeaderboardRow]:
    """Group results by (family, student, method), aggregate over seeds, rank, and order; with ``examples`` (every
    scored cell's ``examples.json``) add the per-example statistics.

    Order: family alphabetically; within a family the teacher row first, then by student, then by
    the primary metric best first (rows that could not be scored last).
    """
    groups: dict[RowKey, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(cell_id(result)[:3], []).append(result)
    rows = sorted((_aggregate_group(key, group) for key, group in groups.items()), key=_row_sort_key)
    _rank(rows)
    _compare_with_sft_by_seed(rows)
    if examples is not None:
        _add_example_statistics(rows, groups, examples)
    return rows


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


# -- over training seeds ---------------------------------------------------------------------------------

def _seed_scores(scored: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Metric → train seed → its score: the mean over that seed's evaluation seeds (in seed order)."""
    per_metric: dict[str, dict[int, float]] = {}
    for result in scored:
        for metric, per_eval_seed in result["metrics"].items():
            if per_eval_seed:
                per_metric.setdefault(metric, {})[int(result["train_seed"])] = statistics.fmean(
                    map(float, per_eval_seed.values()))
    return dict(sorted(per_metric.items()))


def task_seed_scores(scored: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """Task → train seed → ``metric`` on that task: the mean over the seed's evaluation seeds on the experiment's own
    split (extra evaluation sets are under seed labels ``<label>/<seed>``, and are left out). Tasks sorted."""
    per_task: dict[str, dict[int, float]] = {}
    for result in scored:
        own_split = [by_task for seed, by_task in result["per_task"].items() if "/" not in seed]
        for task in sorted({task for by_task in own_split for task in by_task}):
            values = [by_task[task][metric] for by_task in own_split if metric in by_task.get(task, {})]
            if values:
                per_task.setdefault(task, {})[int(result["train_seed"])] = statistics.fmean(values)
    return dict(sorted(per_task.items()))


def distinct_controls(declared: Iterable[Sequence[ControlRecord]]) -> list[ControlRecord]:
    """Each (task, better, worse) of the ``declared`` lists once, in the order first declared (its first mechanism)."""
    seen: dict[tuple[str, str, str], ControlRecord] = {}
    for controls in declared:
        for control in controls:
            seen.setdefault((control["task"], control["better"], control["worse"]), control)
    return list(seen.values())


def _mean_of(scored: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float | None:
    return statistics.fmean(value(result) for result in scored) if scored else None


def _aggregate_group(key: RowKey, group: list[dict[str, Any]]) -> LeaderboardRow:
    family, student, method = key
    scored = sorted((result for result in group if result["status"] == "ok"), key=lambda r: r["train_seed"])
    failures = [{"seed": r["train_seed"], "status": r["status"], **r.get("failure", {})}
                for r in group if r["status"] != "ok"]
    for failure in failures:
        failure.pop("traceback", None)
    primary = str(group[0]["primary_metric"])
    per_seed = _seed_scores(scored)
    eval_seeds = {(r["train_seed"], str(s)) for r in scored for s in r["metrics"].get(primary, {})}
    higher_is_better = {m: bool(h) for r in reversed(scored) for m, h in (r.get("higher_is_better") or {}).items()}
    kind = str(group[0]["kind"])
    return LeaderboardRow(
        family=family, student=student, method=method, kind=kind,
        metrics_mean={metric: statistics.fmean(by_seed.values()) for metric, by_seed in per_seed.items()},
        metrics_std={metric: stats.sample_std(list(by_seed.values())) for metric, by_seed in per_seed.items()},
        metrics_ci95={metric: stats.t_interval(list(by_seed.values())) for metric, by_seed in per_seed.items()},
        n_seeds=len(eval_seeds),
        n_train_seeds=len(scored),
        n_eval_seeds=len({seed for _, seed in eval_seeds}),
        wall_seconds=_mean_of(scored, lambda r: float(r["wall_seconds"]["total"])),
        params=_model_params(scored[0] if scored else group[0], kind),
        config_hashes=sorted({str(r["config_hash"]) for r in group}),
        higher_is_better=higher_is_better,
        primary_metric=primary,
        protocol=group[0].get("protocol"),
        optimizer_steps=_mean_of(scored, lambda r: r["optimizer_steps"]),
        optimizer_steps_total=_mean_of(scored, lambda r: r["optimizer_steps_total"]),
        selected_steps=[int(r["selected_step"]) for r in scored],
        seed_scores=per_seed.get(primary, {}),
        status=failures[0]["status"] if failures else "ok",
        failures=failures,
        train_tokens=_mean_of(scored, lambda r: r["cost"]["own"]["tokens"]),
        train_tokens_total=_mean_of(scored, lambda r: r["cost"]["total"]["tokens"]),
        train_seconds=_mean_of(scored, lambda r: r["cost"]["own"]["seconds"]),
        student_forwards=_mean_of(scored, lambda r: r["forward_passes"]["student"]),
        teacher_forwards=_mean_of(scored, lambda r: r["forward_passes"]["teacher"]),
        peak_memory_mb=max((float(r["peak_memory_mb"]) for r in scored), default=None),
        task_scores=task_seed_scores(scored, primary),
        controls=distinct_controls(r.get("controls") or [] for r in group),  # none in results older than controls
    )


def _model_params(result: Mapping[str, Any], kind: str) -> int | None:
    params = result.get("params") or {}
    # A teacher row evaluates the teacher, so its own size is the teacher's count.
    preferred = ("teacher", "student") if kind == TEACHER_KIND else ("student",)
    for role in preferred:
        if params.get(role) is not None:
            return int(params[role])
    return None


def _ranking_value(row: LeaderboardRow) -> float:
    """Smaller ranks first: the primary metric, negated when higher is better; unscored rows last."""
    metric = row.primary_metric
    if not row.scored:
        return float("inf")
    mean = row.metrics_mean[str(metric)]
    return -mean if row.higher_is_better.get(str(metric), True) else mean


def _row_sort_key(row: LeaderboardRow) -> tuple[str, int, str, int, float, str]:
    return (row.family, 0 if row.is_teacher else 1, row.student, int(row.status != "ok"), _ranking_value(row),
            row.method)


def student_groups(rows: Sequence[LeaderboardRow]) -> dict[tuple[str, str], list[LeaderboardRow]]:
    """The scored student rows of each (family, student), best first."""
    groups: dict[tuple[str, str], list[LeaderboardRow]] = {}
    for row in rows:
        if not row.is_teacher and row.scored:
            groups.setdefault((row.family, row.student), []).append(row)
    return groups


def _rank(rows: Sequence[LeaderboardRow]) -> None:
    for group in student_groups(rows).values():
        for row, rank in zip(group, stats.competition_ranks([-_ranking_value(r) for r in group], True)):
            row.rank = rank


def _compare_with_sft_by_seed(rows: Sequence[LeaderboardRow]) -> None:
    for group in student_groups(rows).values():
        baseline = next((row for row in group if row.method == BASELINE_METHOD), None)
        for row in group:
            if baseline is not None and row is not baseline:
                row.vs_sft = stats.seed_paired(row.seed_scores, baseline.seed_scores)


# -- over test examples ----------------------------------------------------------------------------------

def _set_and_metric(metric: str, sets: Mapping[str, Any]) -> tuple[str, str]:
    """``"sinst/rougeL"`` → (``"sinst"``, ``"rougeL"``) when ``sinst`` is an evaluation set; else the own split."""
    label, _, name = metric.rpartition("/")
    return (label, name) if label and label in sets else ("", metric)


def example_vector(cells: Sequence[CellExamples], metric: str) -> ExampleVector | None:
    """The per-example ``metric`` of a row's scored cells, averaged over evaluation seeds, then training seeds;
    None when a cell lacks it or the cells were not scored on the same examples."""
    per_seed: list[np.ndarray] = []
    fingerprints: set[str] = set()
    example_set = None
    for cell in cells:
        label, name = _set_and_metric(metric, cell["sets"])
        example_set = cell["sets"].get(label)
        by_eval_seed = (example_set or {}).get("scores", {}).get(name)
        if not example_set or not by_eval_seed:
            return None
        fingerprints.add(example_set["fingerprint"])
        per_seed.append(np.mean([np.asarray(v, dtype=float) for v in by_eval_seed.values()], axis=0))
    if example_set is None or len(fingerprints) != 1:
        return None
    return ExampleVector(fingerprints.pop(), np.mean(per_seed, axis=0), list(example_set["gold_words"]))


def _add_example_statistics(rows: Sequence[LeaderboardRow], groups: Mapping[RowKey, list[dict[str, Any]]],
                            examples: Mapping[CellId, CellExamples]) -> None:
    def vector(row: LeaderboardRow, metric: str) -> ExampleVector | None:
        cells = [examples[cell_id(r)] for r in groups[row.key] if r["status"] == "ok" and cell_id(r) in examples]
        return example_vector(cells, metric) if cells and len(cells) == row.n_train_seeds else None

    primary = {row.key: vector(row, str(row.primary_metric)) for row in rows if row.scored}
    for row in rows:
        if row.key in primary and primary[row.key] is not None:
            row.n_examples = len(primary[row.key].values)
        by_length = vector(row, LENGTH_METRIC) if row.scored else None
        if by_length is not None:
            row.length_scores, row.length_counts = stats.length_buckets(by_length.values, by_length.gold_words)
    for family in sorted({row.family for row in rows}):
        _bootstrap_family([row for row in rows if row.family == family], primary)


def _bootstrap_family(rows: Sequence[LeaderboardRow], vectors: Mapping[RowKey, ExampleVector | None]) -> None:
    """Every row of one family scored on the same examples shares one set of resamples: comparisons to the best
    and gaps to SFT and the teacher are paired example by example."""
    present = {key: vector for key, vector in vectors.items() if vector is not None and key[0] == rows[0].family}
    by_fingerprint: dict[str, list[RowKey]] = {}
    for key, vector in present.items():
        by_fingerprint.setdefault(vector.fingerprint, []).append(key)
    for keys in by_fingerprint.values():
        resampled = stats.bootstrap_means(np.stack([present[key].values for key in keys]))
        columns = {key: resampled[:, index] for index, key in enumerate(keys)}
        observed = {key: float(present[key].values.mean()) for key in keys}
        _compare_with_best(rows, columns, observed)
        _gaps(rows, columns)


def _compare_with_best(rows: Sequence[LeaderboardRow], columns: Mapping[RowKey, np.ndarray],
                       observed: Mapping[RowKey, float]) -> None:
    for group in student_groups(rows).values():
        best = group[0]
        if best.key not in columns:
            continue
        higher = best.higher_is_better.get(str(best.primary_metric), True)
        for row in group:
            if row.key in columns:
                behind = observed[best.key] - observed[row.key]
                row.vs_best = stats.compare_to_best(columns[best.key], columns[row.key], behind if higher else -behind,
                                                    higher)


def _gaps(rows: Sequence[LeaderboardRow], columns: Mapping[RowKey, np.ndarray]) -> None:
    teachers = [row for row in rows if row.is_teacher and row.key in columns]
    if len(teachers) != 1:
        return
    teacher = teachers[0]
    for row in rows:
        sft = (row.family, row.student, BASELINE_METHOD)
        if row.is_teacher or row.key not in columns or sft not in columns:
            continue
        metric = str(row.primary_metric)
        baseline = next(r for r in rows if r.key == sft)
        row.gap_recovered = stats.gap_recovered(row.metrics_mean[metric], baseline.metrics_mean[metric],
                                                teacher.metrics_mean[metric])
        if row.gap_recovered is not None:
            row.gap_recovered_ci95 = stats.gap_interval(columns[row.key], columns[sft], columns[teacher.key])


# -- as data ---------------------------------------------------------------------------------------------

def all_metrics(rows: Sequence[LeaderboardRow]) -> list[str]:
    """Union over rows so every record/column set is the same even if a metric is missing somewhere.
    The primary metric leads, the rest follow alphabetically."""
    primaries = [row.primary_metric for row in rows if row.primary_metric]
    primary = max(set(primaries), key=primaries.count) if primaries else None
    return sorted({metric for row in rows for metric in row.metrics_mean}, key=lambda m: (m != primary, m))


def rounded(value: Any) -> Any:
    """Floats (also inside intervals and dicts) to 4 decimals; everything else as it is."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (tuple, list)):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def leaderboard_records(rows: Sequence[LeaderboardRow]) -> list[dict[str, Any]]:
    """One flat dict per row (``kdbench report --format json``); floats rounded to 4 decimals, and a value a row
    lacks is None, so all records share keys."""
    metrics = all_metrics(rows)
    return [_record(row, metrics) for row in rows]


def _record(row: LeaderboardRow, metrics: Sequence[str]) -> dict[str, Any]:
    comparison = row.vs_best
    record: dict[str, Any] = {
        "family": row.family, "student": row.student, "method": row.method, "kind": row.kind, "status": row.status,
        "rank": row.rank, "primary_metric": row.primary_metric, "protocol": row.protocol,
        "n_seeds": row.n_seeds, "n_train_seeds": row.n_train_seeds, "n_eval_seeds": row.n_eval_seeds,
        "n_examples": row.n_examples,
        "same_as_best": None if comparison is None else comparison.same_as_best,
        "diff_to_best": None if comparison is None else comparison.difference,
        "diff_to_best_ci95": None if comparison is None else comparison.interval,
        "p_vs_best": None if comparison is None else comparison.p_value,
        "diff_to_sft_by_seed": None if row.vs_sft is None else row.vs_sft.difference,
        "diff_to_sft_by_seed_ci95": None if row.vs_sft is None else row.vs_sft.interval,
        "p_vs_sft_by_seed": None if row.vs_sft is None else row.vs_sft.p_value,
        "gap_recovered": row.gap_recovered, "gap_recovered_ci95": row.gap_recovered_ci95,
        f"{LENGTH_METRIC}_by_length": row.length_scores or None, "examples_by_length": row.length_counts or None,
        "wall_seconds": row.wall_seconds, "train_seconds": row.train_seconds, "params": row.params,
        "optimizer_steps": row.optimizer_steps, "optimizer_steps_total": row.optimizer_steps_total,
        "train_tokens": row.train_tokens, "train_tokens_total": row.train_tokens_total,
        "student_forwards": row.student_forwards, "teacher_forwards": row.teacher_forwards,
        "peak_memory_mb": row.peak_memory_mb, "selected_step": row.selected_steps, "failures": row.failures,
    }
    for metric in metrics:
        record[f"{metric}_mean"] = row.metrics_mean.get(metric)
        record[f"{metric}_std"] = row.metrics_std.get(metric)
        record[f"{metric}_ci95"] = row.metrics_ci95.get(metric)
    if metrics:  # the rows' task scores are of the primary metric, which leads ``metrics``
        record[f"{metrics[0]}_by_task"] = row.task_means or None
    return rounded(record)
