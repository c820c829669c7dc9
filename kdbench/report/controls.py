"""Positive controls: pairs of methods whose difference on one task a published mechanism predicts (on a task
built for mode-seeking, reverse KL above forward KL). A control that holds shows that the benchmark can see the
effect it was built to measure; one that fails or does not separate says the task, the budget or the seeds cannot.

Per (family, student), each training seed scored by both rows contributes the difference of its per-task scores
(the primary metric on the task, mean over the seed's evaluation seeds on the experiment's own split), better −
worse; the control is judged on the Student-t 95% interval of the mean difference over those seeds
(``kdbench.report.statistics.seed_paired``, the same pairing as the leaderboard's difference to sft). Controls come
from the result files (``controls`` in result.json), so a report needs nothing but the folder.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kdbench.report import statistics as stats
from kdbench.report.leaderboard import LeaderboardRow, RowKey, distinct_controls

Verdict = Literal["holds", "fails", "not separated", "—"]
NOT_RUN = "not run in this folder"


@dataclass(frozen=True)
class Control:
    """A control as the experiment declared it."""

    task: str
    better: str  # the method predicted to score higher on the task (lower, for a metric where lower is better)
    worse: str
    mechanism: str  # why the difference is predicted
    source: str  # the paper it comes from; "" when not given

    @property
    def label(self) -> str:
        return f"{self.task}: {self.better} > {self.worse}"


@dataclass(frozen=True)
class ControlSide:
    """One of the two rows of a control, on the control's task."""

    method: str
    mean: float | None  # the row's per-task score, mean over its scored training seeds; None when missing
    seeds: int  # training seeds with a score on the task
    missing: str | None  # why there is no score ("not run in this folder"); None when there is one


@dataclass(frozen=True)
class ControlOutcome:
    """A control tested on one (family, student)."""

    control: Control
    family: str
    student: str
    metric: str  # the primary metric the task scores are of
    better: ControlSide
    worse: ControlSide
    paired: stats.SeedPaired | None  # better − worse over the training seeds both scored; None when none is shared
    verdict: Verdict
    note: str  # why the verdict is "—"; "" otherwise


def control_outcomes(rows: Sequence[LeaderboardRow]) -> list[ControlOutcome]:
    """Every control the rows' results declare, tested on every (family, student) with student rows: controls in
    declaration order, then (family, student) in leaderboard order."""
    controls = _distinct_controls(rows)
    by_key = {row.key: row for row in rows}
    groups = list(dict.fromkeys((row.family, row.student) for row in rows if not row.is_teacher))
    return [_outcome(control, family, student, by_key) for control in controls for family, student in groups]


def _distinct_controls(rows: Sequence[LeaderboardRow]) -> list[Control]:
    records = distinct_controls(row.controls for row in rows)
    return [Control(r["task"], r["better"], r["worse"], r["mechanism"], r.get("source", "")) for r in records]


def _side(row: LeaderboardRow | None, method: str, task: str) -> tuple[ControlSide, dict[int, float]]:
    """The row's side of the control and its per-seed scores on the task ({} when it has none, with the reason)."""
    if row is None:
        return ControlSide(method, None, 0, NOT_RUN), {}
    if not row.scored:
        return ControlSide(method, None, 0, f"{row.status} on a training seed (see its row)"), {}
    by_seed = row.task_scores.get(task, {})
    if not by_seed:
        return ControlSide(method, None, 0, f"no score on task {task!r}"), {}
    return ControlSide(method, statistics.fmean(by_seed.values()), len(by_seed), None), by_seed


def _outcome(control: Control, family: str, student: str, rows: dict[RowKey, LeaderboardRow]) -> ControlOutcome:
    better_row, worse_row = rows.get((family, student, control.better)), rows.get((family, student, control.worse))
    better, better_scores = _side(better_row, control.better, control.task)
    worse, worse_scores = _side(worse_row, control.worse, control.task)
    scored = better_row if better_row is not None and better_row.scored else worse_row
    metric = str(scored.primary_metric) if scored is not None else ""
    missing = [f"{side.method}: {side.missing}" for side in (better, worse) if side.missing]
    if missing:
        return ControlOutcome(control, family, student, metric, better, worse, None, "—", "; ".join(missing))
    paired = stats.seed_paired(better_scores, worse_scores)
    higher_is_better = scored.higher_is_better.get(metric, True) if scored is not None else True
    verdict, note = _verdict(paired, higher_is_better)
    return ControlOutcome(control, family, student, metric, better, worse, paired, verdict, note)


def _verdict(paired: stats.SeedPaired | None, higher_is_better: bool) -> tuple[Verdict, str]:
    """holds: the interval lies wholly on the predicted side of 0; fails: wholly on the other (the predicted sign
    reversed); not separated: it holds 0. No interval from one shared seed, no comparison from none."""
    if paired is None:
        return "—", "no training seed scored by both rows"
    if paired.interval is None:
        return "—", "one shared training seed: no interval"
    low, high = paired.interval
    predicted, reversed_ = (low > 0, high < 0) if higher_is_better else (high < 0, low > 0)
    if predicted:
        return "holds", ""
    return ("fails", "") if reversed_ else ("not separated", "")
