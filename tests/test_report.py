"""Leaderboards from result files: loading, aggregation over seeds, per-example statistics, ordering, rendering
and published numbers. Synthetic cells are built from the result schema's own types and checked against them
(``check_result``, ``check_examples``), as the report checks the files it reads."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text
from scipy import stats as scipy_stats

from kdbench.errors import KdbenchError
from kdbench.report.build import build_report
from kdbench.report.folder import load_folder, load_results
from kdbench.report.leaderboard import LeaderboardRow, build_leaderboard, leaderboard_records
from kdbench.report.render import render, rich_table, terminal_tables
from kdbench.results import store
from kdbench.results.schema import (
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    CellExamples,
    CellResult,
    CodeVersions,
    Cost,
    ExampleSet,
    ForwardPasses,
    StageCost,
    Tokens,
    Validation,
    WallSeconds,
    check_examples,
    check_result,
)

T_975_1 = float(scipy_stats.t.ppf(0.975, df=1))  # two training seeds: one degree of freedom


def full_result(**fields: Any) -> CellResult:
    """A result with every key of the schema (a scored cell unless ``status`` says otherwise)."""
    result = CellResult(
        schema_version=SCHEMA_VERSION, status="ok", experiment="tiny", key="k" * 16, lineage=["k" * 16],
        versions=CodeVersions(stages={"eval": 3}, objectives={}, sources={}, libraries={}),
        config_hash="hash-a", shared_config_hash="shared", family="f", student="s", method="m", kind="student",
        train_seed=0, primary_metric="rougeL", metrics={}, higher_is_better={"rougeL": True, "exact_match": True},
        per_task={}, eval_examples=4, eval_examples_by_dataset={"": 4},
        wall_seconds=WallSeconds(train=1.0, eval=1.0, total=2.0, this_run=2.0),
        protocol="uniform", protocol_card={"protocol": "uniform"}, tokens=Tokens(train=1000, response=500),
        optimizer_steps=10, optimizer_steps_total=15,
        cost=Cost(own=StageCost(optimizer_steps=10, examples=64, tokens=1000, seconds=1.0), ancestors={},
                  total=StageCost(optimizer_steps=15, examples=96, tokens=1500, seconds=1.5)),
        selected_step=10, validation=Validation(metric="rougeL", curve=[{"step": 10, "value": 40.0}]), processes=1,
        forward_passes=ForwardPasses(student=10, teacher=10), params={"student": 5000, "teacher": 90000},
        peak_memory_mb=100.0, finished_at="2026-11-25T16:00:00+00:00",
    )
    result.update(fields)  # type: ignore[typeddict-item]
    assert set(REQUIRED_KEYS) <= set(result)
    return check_result(result, "the test's result")


def example_set(metrics: dict[str, dict[str, float]], gold_words: list[int], spread: float = 2.0,
                fingerprint: str = "same-examples") -> ExampleSet:
    """Per-example scores whose mean is each metric's value: value − spread, value + spread, … (an even count)."""
    count = len(gold_words)
    scores = {metric: {seed: [value + spread * (-1) ** (i + 1) for i in range(count)] for seed, value in by_seed.items()}
              for metric, by_seed in metrics.items()}
    return ExampleSet(fingerprint=fingerprint, task=["fact", "sort"] * (count // 2), gold_words=gold_words,
                      scores=scores)


def write_cell(run_dir: Path, result: CellResult, sets: dict[str, ExampleSet] | None = None,
               config: dict[str, Any] | None = None) -> Path:
    """result.json, config.json and, for a scored cell, examples.json (by default derived from its metrics)."""
    folder = run_dir / "cells" / result["family"] / result["student"] / result["method"] / f"seed{result['train_seed']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(config or {"scale": "tiny"}), encoding="utf-8")
    if result["status"] == "ok" and result["schema_version"] == SCHEMA_VERSION:
        own = {m: v for m, v in result["metrics"].items() if "/" not in m}
        examples = CellExamples(schema_version=SCHEMA_VERSION, sets=sets or {"": example_set(own, [5, 40, 80, 20])})
        (folder / "examples.json").write_text(json.dumps(check_examples(examples, "the test's examples")))
    return folder / "result.json"


def write_result(
    run_dir: Path,
    *,
    family: str,
    student: str,
    method: str,
    train_seed: int,
    rouge: dict[str, float],
    em: dict[str, float],
    wall_total: float,
    kind: str = "student",
    config_hash: str = "hash-a",
    schema_version: int = SCHEMA_VERSION,
    **fields: Any,
) -> Path:
    result = full_result(
        schema_version=schema_version, config_hash=config_hash, family=family, student=student, method=method,
        kind=kind, train_seed=train_seed, metrics={"rougeL": rouge, "exact_match": em} if rouge else {},
        wall_seconds={"train": wall_total / 2, "eval": wall_total / 2, "total": wall_total, "this_run": wall_total},
        params={"student": 5000 if kind == "student" else 90000, "teacher": 90000}, **fields)
    return write_cell(run_dir, result)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    # gpt2: a teacher whose label sorts after its students, kd over two train seeds, sft over one.
    write_result(tmp_path, family="gpt2", student="zz-teacher", method="teacher", kind="teacher",
                 train_seed=0, rouge={"greedy": 50.0}, em={"greedy": 35.0}, wall_total=8.0)
    write_result(tmp_path, family="gpt2", student="s1", method="kd", train_seed=0,
                 rouge={"10": 40.0, "20": 42.0}, em={"10": 20.0, "20": 22.0}, wall_total=10.0,
                 config_hash="hash-a")
    write_result(tmp_path, family="gpt2", student="s1", method="kd", train_seed=1,
                 rouge={"10": 44.0, "20": 46.0}, em={"10": 24.0, "20": 26.0}, wall_total=20.0,
                 config_hash="hash-b")
    write_result(tmp_path, family="gpt2", student="s1", method="sft", train_seed=0,
                 rouge={"10": 45.0, "20": 47.0}, em={"10": 10.0, "20": 12.0}, wall_total=6.0)
    # bloom sorts before gpt2 and has a single value per metric.
    write_result(tmp_path, family="bloom", student="s1", method="kd", train_seed=0,
                 rouge={"greedy": 30.0}, em={"greedy": 5.0}, wall_total=3.0)
    return tmp_path


def leaderboard(run_dir: Path) -> list[LeaderboardRow]:
    return build_report(run_dir).rows


def rows_by_key(rows: list[LeaderboardRow]) -> dict[tuple[str, str, str], LeaderboardRow]:
    return {(row.family, row.student, row.method): row for row in rows}


def test_load_results_reads_every_cell(run_dir: Path) -> None:
    results = load_results(run_dir)
    assert len(results) == 5
    assert {r["method"] for r in results} == {"teacher", "kd", "sft"}


def test_aggregation_averages_evaluation_seeds_then_training_seeds(run_dir: Path) -> None:
    rows = rows_by_key(leaderboard(run_dir))
    kd = rows[("gpt2", "s1", "kd")]
    # kd's training seeds score 41 (40, 42) and 45 (44, 46): mean 43, sample std √8, t interval 43 ± t·√8/√2.
    assert kd.metrics_mean["rougeL"] == pytest.approx(43.0)
    assert kd.metrics_std["rougeL"] == pytest.approx(math.sqrt(8))
    half = T_975_1 * math.sqrt(8) / math.sqrt(2)
    assert kd.metrics_ci95["rougeL"] == pytest.approx((43.0 - half, 43.0 + half))
    assert kd.metrics_mean["exact_match"] == pytest.approx(23.0)
    assert (kd.n_seeds, kd.n_train_seeds, kd.n_eval_seeds) == (4, 2, 2)
    assert kd.wall_seconds == pytest.approx(15.0)  # mean of totals 10 and 20
    assert kd.params == 5000
    assert kd.config_hashes == ["hash-a", "hash-b"]
    assert (kd.train_tokens, kd.train_tokens_total, kd.student_forwards, kd.teacher_forwards) == (1000, 1500, 10, 10)
    assert kd.peak_memory_mb == 100.0

    sft = rows[("gpt2", "s1", "sft")]
    assert sft.metrics_mean["rougeL"] == pytest.approx(46.0)
    # One training seed: no spread over training seeds, so no std and no interval (not a misleading 0).
    assert sft.metrics_std["rougeL"] is None and sft.metrics_ci95["rougeL"] is None
    assert (sft.n_seeds, sft.n_train_seeds, sft.n_eval_seeds) == (2, 1, 2)

    teacher = rows[("gpt2", "zz-teacher", "teacher")]
    assert teacher.kind == "teacher" and teacher.params == 90000 and teacher.rank is None


def test_rank_significance_and_gap_from_per_example_scores(run_dir: Path) -> None:
    rows = rows_by_key(leaderboard(run_dir))
    sft, kd, bloom = rows[("gpt2", "s1", "sft")], rows[("gpt2", "s1", "kd")], rows[("bloom", "s1", "kd")]
    assert (sft.rank, kd.rank, bloom.rank) == (1, 2, 1)
    # Every example puts kd exactly 3 points behind sft: the bootstrap interval is [3, 3], far from 0.
    assert sft.vs_best is not None and sft.vs_best.same_as_best and sft.vs_best.difference == 0.0
    assert kd.vs_best is not None and not kd.vs_best.same_as_best
    assert kd.vs_best.interval == pytest.approx((3.0, 3.0)) and kd.vs_best.p_value == 0.0
    # Gap recovered: (43 − 46) / (50 − 46), the same on every resample.
    assert kd.gap_recovered == pytest.approx(-0.75) and kd.gap_recovered_ci95 == pytest.approx((-0.75, -0.75))
    assert sft.gap_recovered == 0.0
    assert bloom.gap_recovered is None and bloom.gap_recovered_ci95 is None  # no sft row, no teacher
    assert kd.n_examples == 4
    # Paired by training seed with sft: only seed 0 has both (41 − 46), so there is no interval.
    assert kd.vs_sft is not None and (kd.vs_sft.difference, kd.vs_sft.interval, kd.vs_sft.seeds) == (-5.0, None, 1)
    assert sft.vs_sft is None and bloom.vs_sft is None  # the baseline itself; a student without an sft row
    # Gold lengths 5, 40, 80, 20 words: (0,30] holds the first and last examples (23 − 2, 23 + 2).
    assert kd.length_counts == {"(0,30]": 2, "(30,70]": 1, "(70,inf)": 1}
    assert kd.length_scores == pytest.approx({"(0,30]": 23.0, "(30,70]": 25.0, "(70,inf)": 21.0})


def test_difference_to_sft_is_paired_by_training_seed(run_dir: Path) -> None:
    write_result(run_dir, family="gpt2", student="s1", method="sft", train_seed=1,
                 rouge={"10": 50.0, "20": 52.0}, em={"10": 10.0, "20": 12.0}, wall_total=6.0)
    kd = rows_by_key(leaderboard(run_dir))[("gpt2", "s1", "kd")]
    # kd − sft: seed 0 41 − 46 = −5, seed 1 45 − 51 = −6; the t interval is over those two differences.
    half = T_975_1 * math.sqrt(0.5) / math.sqrt(2)
    assert kd.vs_sft is not None and kd.vs_sft.seeds == 2 and kd.vs_sft.difference == pytest.approx(-5.5)
    assert kd.vs_sft.interval == pytest.approx((-5.5 - half, -5.5 + half))
    assert kd.vs_sft.p_value == pytest.approx(scipy_stats.ttest_rel([41.0, 45.0], [46.0, 51.0]).pvalue)
    text = render(build_report(run_dir), "md")
    assert f"| -5.50 [{-5.5 - half:.2f}, {-5.5 + half:.2f}] |" in text and "'Δ sft by seed'" in text
    records = json.loads(render(build_report(run_dir), "json"))
    record = next(r for r in records if (r["family"], r["method"]) == ("gpt2", "kd"))
    assert record["diff_to_sft_by_seed"] == -5.5
    assert record["diff_to_sft_by_seed_ci95"] == [round(-5.5 - half, 4), round(-5.5 + half, 4)]


def test_rows_scored_on_different_examples_are_not_paired(run_dir: Path) -> None:
    result = full_result(family="gpt2", student="s1", method="odd", metrics={"rougeL": {"10": 10.0}},
                         higher_is_better={"rougeL": True})
    write_cell(run_dir, result, sets={"": example_set(result["metrics"], [1, 2], fingerprint="other-examples")})
    rows = rows_by_key(leaderboard(run_dir))
    odd = rows[("gpt2", "s1", "odd")]
    assert odd.rank == 3 and odd.vs_best is None and odd.gap_recovered is None
    assert rows[("gpt2", "s1", "kd")].vs_best is not None


def test_per_example_statistics_are_deterministic(run_dir: Path) -> None:
    assert render(build_report(run_dir), "json") == render(build_report(run_dir), "json")


def test_ordering_family_then_teacher_then_student_then_rouge_desc(run_dir: Path) -> None:
    rows = leaderboard(run_dir)
    assert [(r.family, r.student, r.method) for r in rows] == [
        ("bloom", "s1", "kd"),
        ("gpt2", "zz-teacher", "teacher"),  # teacher first despite sorting after "s1"
        ("gpt2", "s1", "sft"),  # rougeL 46 beats kd's 43
        ("gpt2", "s1", "kd"),
    ]


@pytest.mark.parametrize(("primary", "order"), [("accuracy", ["high", "low"]), ("bleu", ["low", "high"])])
def test_rows_rank_by_the_experiments_primary_metric(primary: str, order: list[str]) -> None:
    def result(method: str, accuracy: float, bleu: float) -> dict[str, Any]:
        return dict(full_result(method=method, primary_metric=primary,
                                metrics={"bleu": {"0": bleu}, "accuracy": {"0": accuracy}},
                                higher_is_better={"bleu": True, "accuracy": True}))

    rows = build_leaderboard([result("low", 10.0, 90.0), result("high", 20.0, 1.0)])
    assert [r.method for r in rows] == order and [r.rank for r in rows] == [1, 2]
    assert leaderboard_records(rows)[0]["primary_metric"] == primary
    assert list(leaderboard_records(rows)[0]).index(f"{primary}_mean") < list(leaderboard_records(rows)[0]).index(
        f"{({'accuracy', 'bleu'} - {primary}).pop()}_mean")  # the primary metric's columns lead


def test_unscored_cells_keep_their_row_with_status_and_reason(run_dir: Path) -> None:
    """A diverged seed is not averaged in: its row says so, with the stage and step, and ranks last."""
    failure = {"reason": "gpt2/s1/rkl/seed0: train: loss became nan at optimizer step 2",
               "stage": "gpt2/s1/rkl/seed0: train", "stage_key": "abc", "step": 2}
    write_result(run_dir, family="gpt2", student="s1", method="rkl", train_seed=0, rouge={}, em={}, wall_total=0.0,
                 status="diverged", failure=failure)
    report = build_report(run_dir)
    rows = report.rows
    assert [(r.method, r.status) for r in rows if r.family == "gpt2"] == [
        ("teacher", "ok"), ("sft", "ok"), ("kd", "ok"), ("rkl", "diverged")]
    (record,) = [r for r in json.loads(render(report, "json")) if r["method"] == "rkl"]
    assert record["status"] == "diverged" and record["rougeL_mean"] is None and record["n_train_seeds"] == 0
    assert record["rank"] is None and record["same_as_best"] is None
    assert record["failures"] == [{"seed": 0, "status": "diverged", **failure}]
    assert "diverged (seed 0, step 2, gpt2/s1/rkl/seed0: train)" in render(report, "md")
    console = Console(file=io.StringIO(), width=400, record=True)
    console.print(rich_table(rows, title="t"))
    assert "diverged (seed 0, step 2" in console.export_text()
    assert all(row.status == "ok" for row in rows if row.method != "rkl")


def test_json_output_has_every_statistic_and_cost(run_dir: Path) -> None:
    records = json.loads(render(build_report(run_dir), "json"))
    assert len(records) == 4
    required = {"family", "student", "method", "kind", "rank", "n_seeds", "n_train_seeds", "n_eval_seeds", "n_examples",
                "wall_seconds", "train_seconds", "params", "rougeL_mean", "rougeL_std", "rougeL_ci95", "exact_match_mean",
                "exact_match_std", "exact_match_ci95", "same_as_best", "diff_to_best", "diff_to_best_ci95", "p_vs_best",
                "diff_to_sft_by_seed", "diff_to_sft_by_seed_ci95", "p_vs_sft_by_seed", "gap_recovered",
                "gap_recovered_ci95", "exact_match_by_length", "examples_by_length", "optimizer_steps",
                "optimizer_steps_total", "train_tokens", "train_tokens_total", "student_forwards", "teacher_forwards",
                "peak_memory_mb"}
    for record in records:
        assert required <= set(record)
    kd = records[3]
    assert kd["method"] == "kd"
    assert kd["rougeL_mean"] == 43.0 and kd["rougeL_std"] == round(math.sqrt(8), 4)
    half = T_975_1 * math.sqrt(8) / math.sqrt(2)
    assert kd["rougeL_ci95"] == [round(43.0 - half, 4), round(43.0 + half, 4)]
    assert (kd["same_as_best"], kd["gap_recovered"], kd["gap_recovered_ci95"]) == (False, -0.75, [-0.75, -0.75])
    assert kd["exact_match_by_length"] == {"(0,30]": 23.0, "(30,70]": 25.0, "(70,inf)": 21.0}
    sft = records[2]
    assert (sft["rougeL_std"], sft["rougeL_ci95"], sft["n_train_seeds"], sft["n_eval_seeds"]) == (None, None, 1, 2)
    assert records[0]["gap_recovered"] is None  # bloom: no sft row and no teacher


def test_csv_output_has_header_and_one_line_per_row(run_dir: Path) -> None:
    text = render(build_report(run_dir), "csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 4
    assert parsed[0]["family"] == "bloom"
    kd = parsed[3]
    assert float(kd["rougeL_mean"]) == pytest.approx(43.0)
    assert float(kd["rougeL_ci95_low"]) < 43.0 < float(kd["rougeL_ci95_high"])  # an interval is two cells
    assert kd["same_as_best"] == "False" and float(kd["gap_recovered"]) == -0.75
    assert float(kd["exact_match_by_length/(0,30]"]) == 23.0 and kd["selected_step"] == "10;10"
    assert "exact_match_std" in parsed[0] and parsed[2]["rougeL_ci95_low"] == ""


def test_markdown_output_is_the_leaderboard_with_its_statistics(run_dir: Path) -> None:
    text = render(build_report(run_dir), "md")
    table = [line for line in text.splitlines() if line.startswith("| family | student | method | rank")]
    lines = text.splitlines()
    start = lines.index(table[0])
    rows = lines[start + 2:start + 6]
    assert all(line.startswith("|") and line.endswith("|") for line in rows)
    half = T_975_1 * math.sqrt(8) / math.sqrt(2)
    assert f"43.00 ± 2.83 [{43 - half:.2f}, {43 + half:.2f}]" in rows[3]
    assert "| 50.00 |" in rows[1]  # the teacher: one seed, so no spread
    assert "no (p<0.001)" in rows[3] and "| best |" in rows[2]
    assert "-0.75 [-0.75, -0.75]" in rows[3] and "| 2 × 2 |" in rows[3] and "10 / 15" in rows[3]
    assert "paired bootstrap (10,000 resamples" in text  # the method is stated
    assert "| gpt2 | s1 | kd | 23.00 (n=2) | 25.00 (n=1) | 21.00 (n=1) |" in text  # length buckets
    assert "Published numbers" not in text  # a uniform tiny folder reproduces no published row


def test_render_rejects_unknown_format(run_dir: Path) -> None:
    with pytest.raises(KdbenchError, match="md, csv, json, html"):
        render(build_report(run_dir), "xml")


def test_rich_table_styles_teacher_and_bolds_best_student(run_dir: Path) -> None:
    rows = leaderboard(run_dir)
    table = rich_table(rows, title="tiny")
    headers = [str(column.header) for column in table.columns]
    assert headers == ["family", "student", "method", "rank", "rougeL", "exact_match", "Δ sft by seed", "≈ best",
                       "gap recovered", "seeds (train × eval)", "steps (own / total)", "tokens (own / total)",
                       "forwards (student / teacher)", "peak MB", "train s", "wall s", "selected step", "params"]
    assert table.rows[1].style == "dim italic"  # the gpt2 teacher
    assert table.rows[2].style is None

    def cell(column: str, row_index: int) -> Text:
        value = list(table.columns[headers.index(column)].cells)[row_index]
        assert isinstance(value, Text)
        return value

    # gpt2/s1: sft (row 2) wins rougeL, kd (row 3) wins exact_match; the teacher never competes.
    assert cell("rougeL", 2).style == "bold" and cell("rougeL", 3).style == ""
    assert cell("exact_match", 3).style == "bold" and cell("exact_match", 2).style == ""
    assert cell("rougeL", 1).style == ""
    assert cell("rougeL", 0).style == "bold"  # bloom/s1 has one method, so it is best
    Console(file=io.StringIO(), width=200).print(table)  # renders without error


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_a_narrow_terminal_leaves_out_cost_details_first_and_says_so(run_dir: Path, width: int) -> None:
    rows = leaderboard(run_dir)
    table = rich_table(rows, title="tiny", width=width)
    headers = [str(column.header) for column in table.columns]
    # identity, the primary metric, both comparisons, seeds and steps are never left out
    assert {"family", "student", "method", "rank", "rougeL", "Δ sft by seed", "≈ best", "seeds (train × eval)",
            "steps (own / total)"} <= set(headers)
    left_out = [header for header in ("params", "peak MB", "train s", "wall s", "forwards (student / teacher)",
                                      "tokens (own / total)", "gap recovered", "selected step", "exact_match")
                if header not in headers]
    assert left_out, "every column fits nowhere near this width"
    assert f"Left out at this terminal's width ({width} characters): {', '.join(left_out)}." in str(table.caption)
    text = io.StringIO()
    Console(file=text, width=width).print(table)
    assert max(len(line) for line in text.getvalue().splitlines()) <= width
    assert "…" not in text.getvalue()  # cells fold, never end in an ellipsis


def test_a_wide_terminal_shows_every_column(run_dir: Path) -> None:
    rows = leaderboard(run_dir)
    table = rich_table(rows, title="tiny", width=400)
    assert len(table.columns) == len(rich_table(rows, title="tiny").columns) and "Left out" not in str(table.caption)
    text = io.StringIO()
    Console(file=text, width=400).print(table)
    assert "10 / 15" in text.getvalue()  # the steps column, on one line


def test_load_results_missing_dir_names_it_and_suggests_run(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(KdbenchError, match="kdbench run") as info:
        load_results(missing)
    assert str(missing) in str(info.value)


def test_load_results_empty_dir_names_it_and_suggests_run(tmp_path: Path) -> None:
    (tmp_path / "cells").mkdir()
    with pytest.raises(KdbenchError, match="kdbench run") as info:
        load_results(tmp_path)
    assert str(tmp_path) in str(info.value)


def _left_out(run_dir: Path, cell: str) -> str:
    """Why the report left ``cell`` (a path under cells/) out; the other cells are still its rows."""
    folder = load_folder(run_dir)
    assert {f"{r['family']}/{r['student']}/{r['method']}/seed{r['train_seed']}" for r in folder.results} and all(
        cell != f"{r['family']}/{r['student']}/{r['method']}/seed{r['train_seed']}" for r in folder.results)
    reasons = dict(folder.invalid)
    assert list(reasons) == [cell], folder.invalid
    said: list[str] = []  # the rule the runner re-runs a cell by, and the reason it gives
    assert store.finished_result(run_dir / "cells" / cell, "any key", said.append) is None and said == [reasons[cell]]
    return reasons[cell]


def test_a_result_of_another_schema_version_is_left_out_with_the_reason(run_dir: Path) -> None:
    bad = write_result(run_dir, family="gpt2", student="s1", method="kd", train_seed=7,
                       rouge={"0": 1.0}, em={"0": 1.0}, wall_total=1.0, schema_version=1)
    why = _left_out(run_dir, "gpt2/s1/kd/seed7")
    assert "schema_version 1" in why and str(bad) in why and "re-runs that cell" in why


def test_a_result_that_is_not_json_is_left_out_with_the_reason(run_dir: Path) -> None:
    broken = run_dir / "cells" / "gpt2" / "s1" / "kd" / "seed9" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json", encoding="utf-8")
    why = _left_out(run_dir, "gpt2/s1/kd/seed9")
    assert "not valid JSON" in why and str(broken) in why


def test_a_result_of_the_wrong_shape_is_named_with_its_field(run_dir: Path) -> None:
    path = run_dir / "cells" / "gpt2" / "s1" / "sft" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["metrics"]["rougeL"]["10"] = "high"
    path.write_text(json.dumps(result))
    why = _left_out(run_dir, "gpt2/s1/sft/seed0")
    assert re.search(r"metrics\.rougeL\.10", why) and str(path) in why
    assert store.finished_result(path.parent, result["key"]) is None  # so a run scores it again


def test_a_scored_cell_without_its_per_example_scores_is_left_out(run_dir: Path) -> None:
    missing = run_dir / "cells" / "gpt2" / "s1" / "sft" / "seed0" / "examples.json"
    missing.unlink()
    why = _left_out(run_dir, "gpt2/s1/sft/seed0")
    assert "is missing" in why and str(missing) in why
    assert build_report(run_dir).rows  # the other cells still make a leaderboard
    missing.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "sets": {"": {
        "fingerprint": "x", "task": ["a", "b"], "gold_words": [1], "scores": {}}}}))
    assert "2 examples but lists of [1] entries" in _left_out(run_dir, "gpt2/s1/sft/seed0")


def test_a_report_during_a_run_counts_the_grids_cells_without_a_result(run_dir: Path) -> None:
    """The cells a run set out to make (recorded as it starts) that have no result yet are counted, apart from the
    cells a worker is evaluating and those whose files cannot be read."""
    assert load_folder(run_dir).unfinished == ()  # a folder from before grid.json: nothing to compare with
    have = [f"{r['family']}/{r['student']}/{r['method']}/seed{r['train_seed']}" for r in load_results(run_dir)]
    store.record_grid(run_dir, [*have, "gpt2/s1/rkl/seed0", "gpt2/s1/rkl/seed1"])
    store.record_grid(run_dir, ["opt/s1/rkl/seed0"])  # a second run on the folder adds its cells
    assert load_folder(run_dir).unfinished == ("gpt2/s1/rkl/seed0", "gpt2/s1/rkl/seed1", "opt/s1/rkl/seed0")
    (run_dir / "cells/gpt2/s1/rkl/seed1").mkdir(parents=True)
    (run_dir / "cells/gpt2/s1/rkl/seed1/result.json").write_text("{")  # written, but unreadable: listed as such
    folder = load_folder(run_dir)
    assert folder.unfinished == ("gpt2/s1/rkl/seed0", "opt/s1/rkl/seed0") and len(folder.invalid) == 1


def test_a_folder_of_unreadable_cells_only_is_an_error_that_names_one(tmp_path: Path) -> None:
    broken = tmp_path / "cells" / "gpt2" / "s1" / "kd" / "seed0" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("[]", encoding="utf-8")
    with pytest.raises(KdbenchError, match="1 cannot be read") as info:
        load_results(tmp_path)
    assert str(broken) in str(info.value)


def test_settings_mismatches_flag_families_whose_cells_ran_with_different_shared_settings() -> None:
    from kdbench.report.leaderboard import settings_mismatches

    def cell(family: str, method: str, shared: str) -> dict:
        return {"family": family, "student": "s1", "method": method, "train_seed": 0, "shared_config_hash": shared}

    same = [cell("gpt2", "sft", "aaa"), cell("gpt2", "kd", "aaa"), cell("opt", "sft", "bbb")]
    assert settings_mismatches(same) == []
    mixed = same + [cell("opt", "kd", "ccc")]
    messages = settings_mismatches(mixed)
    assert len(messages) == 1 and messages[0].startswith("opt: cells ran with 2 different shared settings")
    assert "s1/kd/seed0" in messages[0] and "s1/sft/seed0" in messages[0]


# -- published numbers -----------------------------------------------------------------------------------

PAPER_CONFIG = {"scale": "paper", "teacher": {"label": "gpt2-xl"}, "data": {"dataset": "dolly"},
                "evaluation": {"datasets": {"self": {"dataset": "selfinst"}}}}


def write_paper_folder(run_dir: Path, protocol: str = "paper") -> None:
    """GPT-2 120M ← gpt2-xl on Dolly and SelfInst (labelled "self"), as the paper experiment files run it."""
    for student, method, dolly, selfinst in (("gpt2-xl", "teacher", 27.0, 14.0), ("120M", "sft", 23.0, 10.0),
                                             ("120M", "kd", 22.5, 11.0)):
        metrics = {"rougeL": {"10": dolly}, "self/rougeL": {"10": selfinst}}
        result = full_result(family="gpt2", student=student, method=method, protocol=protocol, metrics=metrics,
                             kind="teacher" if method == "teacher" else "student", higher_is_better={
                                 "rougeL": True, "self/rougeL": True})
        sets = {"": example_set({"rougeL": metrics["rougeL"]}, [10, 20]),
                "self": example_set({"rougeL": metrics["self/rougeL"]}, [10, 20], fingerprint="selfinst")}
        write_cell(run_dir, result, sets, PAPER_CONFIG)


def test_published_numbers_stand_beside_a_paper_reproduction(tmp_path: Path) -> None:
    write_paper_folder(tmp_path)
    report = build_report(tmp_path)
    assert [(m.published.pair, m.column) for m in report.published] == [
        ("GPT-2 120M ← 1.5B, Dolly", "rougeL"), ("GPT-2 120M ← 1.5B, SelfInst", "self/rougeL")]
    text = render(report, "md")
    published = text[text.index("Published numbers"):]
    assert "arXiv:2406.19774v2, Table 1" in published and "5 sampling seeds" in published
    assert "| GPT-2 120M ← 1.5B, Dolly | 23.3 | 22.8 | 22.7 | 24.6 | 24.6 | 27.6 |" in published
    assert "| reproduced here (protocol paper) | gpt2/120M, rougeL | 23.0 | 22.5 | — | — | — | 27.0 |" in published
    assert "| gpt2/120M, self/rougeL | 10.0 | 11.0 | — | — | — | 14.0 |" in published
    leaderboard_part = text[:text.index("Published numbers")]
    assert "23.3" not in leaderboard_part  # never mixed into the leaderboard
    assert not any("published" in json.dumps(r) for r in json.loads(render(report, "json")))


def test_published_numbers_need_the_paper_protocol_and_the_same_models(tmp_path: Path) -> None:
    write_paper_folder(tmp_path / "uniform", protocol="uniform")
    assert build_report(tmp_path / "uniform").published == []
    write_paper_folder(tmp_path / "other")
    for config in (tmp_path / "other").glob("cells/**/config.json"):
        config.write_text(json.dumps({**PAPER_CONFIG, "teacher": {"label": "my-own-teacher"}}))
    assert build_report(tmp_path / "other").published == []


# -- per-task scores and positive controls ---------------------------------------------------------------

MECHANISM = "reverse KL is mode-seeking: it puts the student's mass on one mode"
CONTROLS = [  # as an experiment declares them, in this order
    {"task": "modes", "better": "rkl", "worse": "kd", "mechanism": MECHANISM, "source": "MiniLLM (Gu et al., 2024)"},
    {"task": "long", "better": "rkl", "worse": "kd", "mechanism": "exposure bias grows with length", "source": ""},
    {"task": "noisy", "better": "rkl", "worse": "kd", "mechanism": "noise is a mode the student may skip",
     "source": "DistiLLM"},
    {"task": "modes", "better": "sft", "worse": "kd", "mechanism": "gold has one mode", "source": ""},
    {"task": "modes", "better": "rkl", "worse": "fkd", "mechanism": "fkd covers every mode", "source": ""},
]
# method → training seed → task → the two evaluation seeds' rougeL on that task.
TASK_SCORES: dict[str, dict[int, dict[str, tuple[float, float]]]] = {
    # modes: rkl − kd = 10, 11, 8 (holds); long: −9, −11, −11 (fails); noisy: 5, −6, 1 (not separated).
    "rkl": {0: {"modes": (50, 52), "long": (30, 32), "noisy": (60, 60)},
            1: {"modes": (55, 57), "long": (31, 33), "noisy": (50, 50)},
            2: {"modes": (53, 51), "long": (29, 31), "noisy": (55, 55)}},
    "kd": {0: {"modes": (40, 42), "long": (40, 40), "noisy": (55, 55)},
           1: {"modes": (44, 46), "long": (42, 44), "noisy": (56, 56)},
           2: {"modes": (45, 43), "long": (41, 41), "noisy": (54, 54)}},
    "sft": {0: {"modes": (45, 46), "long": (35, 35), "noisy": (50, 52)}},  # one training seed
    "teacher": {0: {"modes": (90, 92), "long": (80, 80), "noisy": (70, 72)}},
}


def per_task(scores: dict[str, tuple[float, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """result.json's per_task: the own split's two evaluation seeds, and an extra set (``sinst/10``) whose scores
    must be left out of every per-task number."""
    own = {seed: {task: {"rougeL": float(pair[index]), "exact_match": 1.0} for task, pair in scores.items()}
           for index, seed in enumerate(("10", "20"))}
    return {**own, "sinst/10": {task: {"rougeL": 1000.0, "exact_match": 1000.0} for task in scores}}


@pytest.fixture()
def controls_dir(tmp_path: Path) -> Path:
    """gpt2/s1: rkl and kd over three training seeds, sft over one (written before controls existed: no key), and
    the teacher; every other cell records CONTROLS."""
    for method, by_seed in TASK_SCORES.items():
        for seed, scores in by_seed.items():
            overall = float(np.mean([np.mean(pair) for pair in scores.values()]))
            result = full_result(family="gpt2", student="teacher" if method == "teacher" else "s1", method=method,
                                 kind="teacher" if method == "teacher" else "student", train_seed=seed,
                                 metrics={"rougeL": {"10": overall, "20": overall}, "exact_match": {"10": 1.0, "20": 1.0}},
                                 per_task=per_task(scores), **({} if method == "sft" else {"controls": CONTROLS}))
            write_cell(tmp_path, result)
    return tmp_path


def seed_task_score(method: str, seed: int, task: str) -> float:
    return float(np.mean(TASK_SCORES[method][seed][task]))


def test_per_task_scores_are_the_mean_over_training_seeds_of_each_seeds_evaluation_mean(controls_dir: Path) -> None:
    report = build_report(controls_dir)
    records = {r["method"]: r for r in json.loads(render(report, "json"))}
    text = render(report, "md")
    assert "Per task (rougeL)" in text and "| family | student | method | long | modes | noisy |" in text
    for method, by_seed in TASK_SCORES.items():
        by_task = {task: [seed_task_score(method, seed, task) for seed in by_seed] for task in ("long", "modes", "noisy")}
        assert records[method]["rougeL_by_task"] == {task: round(float(np.mean(v)), 4) for task, v in by_task.items()}
        cells = [f"{np.mean(v):.2f}" + (f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else "") for v in by_task.values()]
        student = "teacher" if method == "teacher" else "s1"
        assert f"| gpt2 | {student} | {method} | {' | '.join(cells)} |" in text, method
    # rkl's long: seeds 31, 32, 30 → 31.00 ± 1.00; the extra set's 1000s are left out.
    assert records["rkl"]["rougeL_by_task"]["long"] == 31.0 and "| 31.00 ± 1.00 |" in text


def test_json_stays_a_list_of_rows_with_the_per_task_scores(controls_dir: Path) -> None:
    records = json.loads(render(build_report(controls_dir), "json"))
    assert isinstance(records, list) and len(records) == 4
    assert all(set(r["rougeL_by_task"]) == {"long", "modes", "noisy"} for r in records)
    assert not any("controls" in r or "Positive" in json.dumps(r) for r in records)  # controls are not rows
    parsed = list(csv.DictReader(io.StringIO(render(build_report(controls_dir), "csv"))))
    assert float(next(r for r in parsed if r["method"] == "rkl")["rougeL_by_task/long"]) == 31.0


def test_positive_controls_equal_a_hand_computation(controls_dir: Path) -> None:
    report = build_report(controls_dir)
    outcomes = report.controls
    assert [(o.control.label, o.family, o.student) for o in outcomes] == [
        (f"{c['task']}: {c['better']} > {c['worse']}", "gpt2", "s1") for c in CONTROLS]  # declaration order
    assert [o.verdict for o in outcomes] == ["holds", "fails", "not separated", "—", "—"]
    text = render(report, "md")
    for outcome, task in zip(outcomes[:3], ("modes", "long", "noisy")):
        better = [seed_task_score("rkl", seed, task) for seed in range(3)]
        worse = [seed_task_score("kd", seed, task) for seed in range(3)]
        differences = np.subtract(better, worse)
        low, high = scipy_stats.t.interval(0.95, df=2, loc=differences.mean(), scale=scipy_stats.sem(differences))
        p_value = scipy_stats.ttest_rel(better, worse).pvalue
        paired = outcome.paired
        assert paired is not None and paired.seeds == 3 and outcome.metric == "rougeL"
        assert paired.difference == pytest.approx(differences.mean())
        assert paired.interval == pytest.approx((low, high)) and paired.p_value == pytest.approx(p_value)
        assert outcome.better.mean == pytest.approx(np.mean(better)) and outcome.worse.mean == pytest.approx(np.mean(worse))
        shown = "<0.001" if p_value < 0.001 else f"{p_value:.3f}"
        assert (f"| rkl {np.mean(better):.2f} | kd {np.mean(worse):.2f} | {differences.mean():+.2f} [{low:.2f}, "
                f"{high:.2f}] | {shown} | 3 | {outcome.verdict} |") in text
    # modes: 51, 56, 52 against 41, 45, 44: +9.67, its interval wholly above 0.
    assert outcomes[0].paired is not None and outcomes[0].paired.difference == pytest.approx(29 / 3)


def test_a_control_with_one_shared_seed_or_a_missing_row_has_no_verdict(controls_dir: Path) -> None:
    report = build_report(controls_dir)
    one_seed, missing = report.controls[3], report.controls[4]
    assert one_seed.paired is not None and one_seed.paired.seeds == 1 and one_seed.paired.interval is None
    assert one_seed.paired.difference == pytest.approx(seed_task_score("sft", 0, "modes") - seed_task_score("kd", 0, "modes"))
    assert (one_seed.verdict, one_seed.note) == ("—", "one shared training seed: no interval")
    assert missing.paired is None and missing.worse.mean is None and missing.better.mean == pytest.approx(53.0)
    assert (missing.verdict, missing.note) == ("—", "fkd: not run in this folder")
    text = render(report, "md")
    assert "| modes: rkl > fkd [5] | gpt2 | s1 | rkl 53.00 | fkd — | — | — | — | — (fkd: not run in this folder) |" in text
    assert "| +4.50 | — | 1 | — (one shared training seed: no interval) |" in text  # 45.5 − 41
    write_result(controls_dir, family="gpt2", student="s1", method="fkd", train_seed=0, rouge={}, em={}, wall_total=0.0,
                 status="diverged", failure={"reason": "nan", "stage": "s", "stage_key": "k", "step": 3})
    assert build_report(controls_dir).controls[4].note == "fkd: diverged on a training seed (see its row)"


def test_the_markdown_and_terminal_show_both_tables_with_each_mechanism(controls_dir: Path) -> None:
    report = build_report(controls_dir)
    text = render(report, "md")
    assert text.index("Statistics:") < text.index("Per task (rougeL)") < text.index("Positive controls")
    assert f"- [1] modes: rkl > kd — {MECHANISM} (MiniLLM (Gu et al., 2024))" in text
    assert "- [2] long: rkl > kd — exposure bias grows with length\n" in text  # no source given
    console = Console(file=io.StringIO(), width=220, record=True)
    console.print(*terminal_tables(report.rows, title="t"))
    shown = console.export_text()
    assert shown.index("Statistics:") < shown.index("Per task (rougeL)") < shown.index("Positive controls")
    for expected in ("not separated", "fails", "holds", "fkd: not run in this folder", MECHANISM, "31.00 ± 1.00"):
        assert expected in " ".join(shown.split()), expected


@pytest.mark.parametrize("width", [50, 80])
def test_narrow_terminal_folds_the_per_task_and_controls_tables(controls_dir: Path, width: int) -> None:
    text = io.StringIO()
    Console(file=text, width=width).print(*terminal_tables(build_report(controls_dir).rows, title="t", width=width))
    lines = text.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width and "…" not in text.getvalue()
    if width == 50:  # the three tasks do not fit one table of 50 characters: they are split, names repeated
        assert "Per task (rougeL), continued" in text.getvalue()
    assert sum("31.00 ± 1.00" in line for line in lines) == 1


def test_results_without_controls_report_none(run_dir: Path) -> None:
    report = build_report(run_dir)
    assert report.controls == [] and "Positive controls" not in render(report, "md")
    assert "Per task" not in render(report, "md")  # no per-task scores in these results
    assert all(r["rougeL_by_task"] is None for r in json.loads(render(report, "json")))


def test_the_html_page_shows_the_controls_and_per_task_scores(controls_dir: Path) -> None:
    page = render(build_report(controls_dir), "html")
    assert 'id="controls"' in page and "not separated" in page and "31.00 ± 1.00" in page
    assert "reverse KL is mode-seeking: it puts the student&#39;s mass on one mode (MiniLLM" in page  # escaped
    assert "against student parameters" not in page  # one student size


def test_the_html_page_plots_the_metric_against_student_size_only_with_two_sizes(run_dir: Path) -> None:
    before = render(build_report(run_dir), "html")
    assert "against student parameters" not in before and before.count("<svg") == 2 * 3
    for student, params, rouge in (("s2", 20_000, 48.0), ("s3", 80_000, 49.0)):
        write_cell(run_dir, full_result(family="gpt2", student=student, method="kd", metrics={"rougeL": {"10": rouge}},
                                        params={"student": params, "teacher": 90000}))
    page = render(build_report(run_dir), "html")
    assert page.count("against student parameters") == 1 and page.count("<svg") == 2 * 3 + 1  # gpt2 only
    figure = page[page.index("against student parameters"):]
    assert ">teacher (zz-teacher)</text>" in figure and ">kd</text>" in figure and ">student parameters</text>" in figure


# -- the command -----------------------------------------------------------------------------------------

def kdbench_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    from kdbench import cli

    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return int(exit_info.value.code or 0)


def test_report_writes_any_format_to_a_file_and_refuses_a_bad_output(run_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "leaderboard.json"
    assert kdbench_main(monkeypatch, "report", str(run_dir), "-f", "json", "-o", str(target)) == 0
    assert json.loads(target.read_text()) == json.loads(render(build_report(run_dir), "json"))
    capsys.readouterr()
    for bad, message in ((tmp_path, "is a folder"), (Path("/proc/no-such-dir/report.html"), "Cannot write the report")):
        assert kdbench_main(monkeypatch, "report", str(run_dir), "-f", "html", "-o", str(bad)) == 2
        err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
        assert message in err and str(bad) in err and "Traceback" not in err
    assert kdbench_main(monkeypatch, "report", str(run_dir), "-o", str(target)) == 2  # the table is for the terminal
    assert "--format table prints to the terminal" in " ".join(capsys.readouterr().err.split())


REFERENCES = sorted(p for p in (Path(__file__).resolve().parents[1] / "results" / "reference").iterdir() if p.is_dir())


@pytest.mark.parametrize("folder", REFERENCES, ids=lambda p: p.name)
def test_committed_references_read_under_the_current_schema(folder: Path) -> None:
    """Every committed reference is remade when the result schema changes: it loads, states its protocol on every
    row, gives equal own-stage steps to its student rows (uniform), and its README names the command that made it."""
    report = build_report(folder)
    rows = report.rows
    assert rows and {row.protocol for row in rows} == {"uniform"}
    for family in {row.family for row in rows}:
        steps = {row.optimizer_steps for row in rows if row.family == family and not row.is_teacher}
        assert len(steps) == 1, (family, steps)
    assert "kdbench run" in (folder / "README.md").read_text()
    assert json.loads((folder / "leaderboard.json").read_text()) == json.loads(render(report, "json"))
    for fmt in ("md", "csv"):
        assert (folder / f"leaderboard.{fmt}").read_text().rstrip("\n") == render(report, fmt).rstrip("\n"), fmt
    assert (folder / "leaderboard.html").stat().st_size > 0


def test_readme_tables_are_the_committed_references() -> None:
    """The project README shows reference leaderboards between ``<!-- reference: NAME -->`` and
    ``<!-- /reference -->``; each block is exactly ``results/reference/NAME/leaderboard.md``."""
    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"<!-- reference: ([\w.-]+) -->\n(.*?)<!-- /reference -->", (root / "README.md").read_text(),
                        flags=re.S)
    assert blocks, "the README shows no reference leaderboard"
    for name, block in blocks:
        assert block == (root / "results" / "reference" / name / "leaderboard.md").read_text(), name


def test_html_escapes_every_name_and_draws_a_family_with_nothing_scored(run_dir: Path) -> None:
    """Names from configs reach the table and the figures' text: both escape them (matplotlib as XML, Jinja as
    HTML), and ``$`` is drawn as it is rather than read as TeX."""
    hostile = '<img src=x onerror="alert(1)">$x$'
    result = full_result(family="gpt2", student="s1", method=hostile, metrics={"rougeL": {"10": 41.0}},
                         higher_is_better={"rougeL": True})
    folder = write_cell(run_dir, result).parent
    (folder / "samples.json").write_text(json.dumps([{"prompt": "<b>p</b>", "response": hostile, "reference": "r"}]))
    write_result(run_dir, family="empty", student="s1", method="kd", train_seed=0, rouge={}, em={}, wall_total=0.0,
                 status="failed", failure={"reason": "boom", "stage": "empty/s1/kd/seed0: train", "stage_key": "x",
                                           "step": None})
    page = render(build_report(run_dir), "html")
    assert "<img" not in page and "<b>p</b>" not in page and "<script" not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;$x$" in page  # the table, the samples (HTML escaping)
    assert '&lt;img src=x onerror="alert(1)"&gt;$x$</text>' in page  # the figures' text (matplotlib's XML escaping)
    assert page.count("<svg") == 3 * 3  # bloom, empty and gpt2: three figures each, drawn even with nothing scored
