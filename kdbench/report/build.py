"""A report: everything ``kdbench report`` shows, built once from a results folder and rendered in any format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdbench.report.card import ProtocolCard, cards_of
from kdbench.report.controls import ControlOutcome, control_outcomes
from kdbench.report.folder import ResultsFolder, load_folder
from kdbench.report.leaderboard import LeaderboardRow, build_leaderboard, settings_mismatches
from kdbench.report.published import Match, matches


@dataclass(frozen=True)
class Report:
    title: str
    folder: ResultsFolder
    rows: list[LeaderboardRow]
    cards: list[ProtocolCard]  # one per distinct protocol card among the cells
    published: list[Match]  # published numbers this folder reproduces (protocol paper only)
    warnings: list[str]  # families whose cells do not compare like with like
    controls: list[ControlOutcome]  # each positive control the results declare, per (family, student)


def build_report(run_dir: Path, title: str | None = None) -> Report:
    folder = load_folder(run_dir)
    rows = build_leaderboard(folder.results, folder.examples)
    return Report(
        title=title or f"kdbench leaderboard: {run_dir}",
        folder=folder,
        rows=rows,
        cards=cards_of(folder.results),
        published=matches(folder),
        warnings=settings_mismatches(folder.results),
        controls=control_outcomes(rows),
    )
