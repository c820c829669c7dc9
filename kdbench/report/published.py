"""Published numbers, shown beside a paper experiment's reproduced rows and never mixed into its leaderboard.

They were measured by other people under their own protocol (docs/evaluation.md, "Published numbers"), so a report
prints them in a table of their own, labelled with their source and protocol, and only for a results folder
run under ``protocol: paper`` with the same teacher, student and evaluation set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdbench.report.folder import ResultsFolder, cell_id
from kdbench.report.leaderboard import TEACHER_KIND, LeaderboardRow

METHODS = ("sft", "kd", "seqkd", "minillm", "dpkd")  # the published columns, as kdbench names the methods
TEACHER_COLUMN = "teacher"


@dataclass(frozen=True)
class PublishedRow:
    pair: str  # as the paper writes it
    family: str  # kdbench's model family
    teacher: str  # the teacher's label in kdbench's family table (its checkpoint)
    student: str  # the student's label in kdbench's family table
    dataset: str  # kdbench's name of the evaluation set
    scores: dict[str, float]  # method (or "teacher") → score


@dataclass(frozen=True)
class PublishedTable:
    source: str
    protocol: str
    metric: str  # kdbench's metric the scores are comparable with
    rows: tuple[PublishedRow, ...]


def _row(pair: str, family: str, teacher: str, student: str, dataset: str, *scores: float) -> PublishedRow:
    return PublishedRow(pair, family, teacher, student, dataset, dict(zip((*METHODS, TEACHER_COLUMN), scores)))


DPKD_V2_TABLE_1 = PublishedTable(
    source="Li et al., Direct Preference Knowledge Distillation for Large Language Models, arXiv:2406.19774v2, "
           "Table 1 (docs/evaluation.md, 'Published numbers')",
    protocol="each method as released (MiniLLM / DPKD settings): ROUGE-L ×100, mean over 5 sampling seeds "
             "(temperature 1); one training seed for DPKD, 5-seed means for the rest",
    metric="rougeL",
    rows=(
        _row("GPT-2 120M ← 1.5B, Dolly", "gpt2", "gpt2-xl", "120M", "dolly", 23.3, 22.8, 22.7, 24.6, 24.6, 27.6),
        _row("GPT-2 120M ← 1.5B, SelfInst", "gpt2", "gpt2-xl", "120M", "selfinst", 10.0, 10.8, 10.1, 13.2, 13.8, 14.3),
        _row("GPT-2 120M ← 1.5B, S-NI", "gpt2", "gpt2-xl", "120M", "sinst", 16.3, 13.4, 16.4, 25.3, 25.4, 27.6),
        _row("GPT-2 340M ← 1.5B, Dolly", "gpt2", "gpt2-xl", "340M", "dolly", 25.5, 25.0, 25.3, 25.4, 26.0, 27.6),
        _row("OPT 1.3B ← 13B, Dolly", "opt", "facebook/opt-13b", "1.3B", "dolly", 26.0, 25.4, 26.1, 26.7, 27.2, 29.2),
        _row("OPT 1.3B ← 13B, SelfInst", "opt", "facebook/opt-13b", "1.3B", "selfinst", 11.4, 12.2, 12.7, 14.8, 14.9,
             18.4),
        _row("OPT 1.3B ← 13B, S-NI", "opt", "facebook/opt-13b", "1.3B", "sinst", 23.1, 21.9, 21.4, 28.6, 28.7, 30.4),
    ),
)
TABLES = (DPKD_V2_TABLE_1,)


@dataclass(frozen=True)
class Match:
    """A published row and the leaderboard column its numbers are comparable with."""

    table: PublishedTable
    published: PublishedRow
    column: str  # "rougeL" (the experiment's own split) or "<set label>/rougeL"

    def reproduced(self, rows: Sequence[LeaderboardRow]) -> dict[str, float | None]:
        """This folder's mean per published method (and the teacher), on the matching column."""
        family = self.published.family
        by_method = {row.method: row for row in rows if row.family == family and row.student == self.published.student}
        teacher = next((row for row in rows if row.family == family and row.is_teacher), None)
        chosen = {**{m: by_method.get(m) for m in METHODS}, TEACHER_COLUMN: teacher}
        return {name: row.metrics_mean.get(self.column) if row else None for name, row in chosen.items()}


def _sets(config: Mapping[str, Any]) -> dict[str, str]:
    """Leaderboard column prefix → dataset name, for the experiment's own split and each extra set."""
    extra = config.get("evaluation", {}).get("datasets", {}) or {}
    return {"": str(config.get("data", {}).get("dataset")), **{f"{label}/": str(spec.get("dataset"))
                                                              for label, spec in extra.items()}}


def matches(folder: ResultsFolder) -> list[Match]:
    """The published rows this folder reproduces: protocol paper, paper-scale models, same pair and set."""
    if not folder.results or any(result.get("protocol") != "paper" for result in folder.results):
        return []
    found: list[Match] = []
    students = {(str(r["family"]), str(r["student"])): folder.configs.get(cell_id(r), {}) for r in folder.results
                if r["kind"] != TEACHER_KIND}
    for (family, student), config in sorted(students.items()):
        if config.get("scale") != "paper":
            continue
        teacher = str((config.get("teacher") or {}).get("label"))
        for prefix, dataset in _sets(config).items():
            found += [Match(table, row, f"{prefix}{table.metric}") for table in TABLES for row in table.rows
                      if (row.family, row.teacher, row.student, row.dataset) == (family, teacher, student, dataset)]
    return found
