"""Leaderboards from result.json files: loading, pooled aggregation, ordering and rendering."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from kdbench.errors import KdbenchError
from kdbench.report.leaderboard import (
    LeaderboardRow,
    build_leaderboard,
    leaderboard_records,
    load_results,
    render,
    rich_table,
)
from kdbench.results.schema import REQUIRED_KEYS, SCHEMA_VERSION


def full_result(**fields: Any) -> dict[str, Any]:
    """A result with every key of the schema (a scored cell unless ``status`` says otherwise)."""
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "status": "ok", "experiment": "tiny", "key": "k" * 16,
        "lineage": ["k" * 16], "versions": {"stages": {"eval": 1}, "objectives": {}, "sources": {}, "libraries": {}},
        "config_hash": "hash-a", "shared_config_hash": "shared", "family": "f", "student": "s", "method": "m",
        "kind": "student", "train_seed": 0, "primary_metric": "rougeL", "metrics": {},
        "higher_is_better": {"rougeL": True, "exact_match": True}, "per_task": {}, "eval_examples": 2,
        "eval_examples_by_dataset": {"": 2}, "wall_seconds": {"train": 1.0, "eval": 1.0, "total": 2.0, "this_run": 2.0},
        "tokens": {"train": 1000, "response": 500}, "optimizer_steps": 10, "processes": 1,
        "protocol": "uniform", "protocol_card": {"protocol": "uniform"}, "optimizer_steps_total": 15, "selected_step": 10,
        "cost": {"own": {"optimizer_steps": 10, "examples": 64, "tokens": 1000, "seconds": 1.0}, "ancestors": {},
                 "total": {"optimizer_steps": 15, "examples": 96, "tokens": 1500, "seconds": 1.5}},
        "validation": {"metric": "rougeL", "curve": [{"step": 10, "value": 40.0}]},
        "forward_passes": {"student": 10, "teacher": 10}, "params": {"student": 5000, "teacher": 90000},
        "peak_memory_mb": 100.0, "finished_at": "2026-11-25T16:00:00+00:00",
    }
    result.update(fields)
    assert set(REQUIRED_KEYS) <= set(result)
    return result


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
    path = run_dir / "cells" / family / student / method / f"seed{train_seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")
    return path


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


def rows_by_key(rows: list[LeaderboardRow]) -> dict[tuple[str, str, str], LeaderboardRow]:
    return {(row.family, row.student, row.method): row for row in rows}


def test_load_results_reads_every_cell(run_dir: Path) -> None:
    results = load_results(run_dir)
    assert len(results) == 5
    assert {r["method"] for r in results} == {"teacher", "kd", "sft"}


def test_aggregation_pools_eval_values_across_train_seeds(run_dir: Path) -> None:
    rows = rows_by_key(build_leaderboard(load_results(run_dir)))
    kd = rows[("gpt2", "s1", "kd")]
    # rougeL pooled = [40, 42, 44, 46]: mean 43, sample variance (9+1+1+9)/3 = 20/3.
    assert kd.metrics_mean["rougeL"] == pytest.approx(43.0)
    assert kd.metrics_std["rougeL"] == pytest.approx(math.sqrt(20 / 3))
    assert kd.metrics_mean["exact_match"] == pytest.approx(23.0)
    assert kd.metrics_std["exact_match"] == pytest.approx(math.sqrt(20 / 3))
    assert kd.n_seeds == 4
    assert kd.n_train_seeds == 2
    assert kd.wall_seconds == pytest.approx(15.0)  # mean of totals 10 and 20
    assert kd.params == 5000
    assert kd.config_hashes == ["hash-a", "hash-b"]

    sft = rows[("gpt2", "s1", "sft")]
    assert sft.metrics_std["rougeL"] == pytest.approx(math.sqrt(2))  # [45, 47]
    assert sft.n_seeds == 2 and sft.n_train_seeds == 1

    bloom = rows[("bloom", "s1", "kd")]
    assert bloom.metrics_std["rougeL"] == 0.0  # one value -> 0.0, not NaN
    assert bloom.n_seeds == 1

    teacher = rows[("gpt2", "zz-teacher", "teacher")]
    assert teacher.kind == "teacher"
    assert teacher.params == 90000


def test_ordering_family_then_teacher_then_student_then_rouge_desc(run_dir: Path) -> None:
    rows = build_leaderboard(load_results(run_dir))
    assert [(r.family, r.student, r.method) for r in rows] == [
        ("bloom", "s1", "kd"),
        ("gpt2", "zz-teacher", "teacher"),  # teacher first despite sorting after "s1"
        ("gpt2", "s1", "sft"),  # rougeL 46 beats kd's 43
        ("gpt2", "s1", "kd"),
    ]


@pytest.mark.parametrize(("primary", "order"), [("accuracy", ["high", "low"]), ("bleu", ["low", "high"])])
def test_rows_rank_by_the_experiments_primary_metric(primary: str, order: list[str]) -> None:
    def result(method: str, accuracy: float, bleu: float) -> dict[str, Any]:
        return full_result(method=method, primary_metric=primary, metrics={"bleu": {"0": bleu}, "accuracy": {"0": accuracy}},
                           higher_is_better={"bleu": True, "accuracy": True})

    rows = build_leaderboard([result("low", 10.0, 90.0), result("high", 20.0, 1.0)])
    assert [r.method for r in rows] == order
    assert leaderboard_records(rows)[0]["primary_metric"] == primary
    assert list(leaderboard_records(rows)[0]).index(f"{primary}_mean") < list(leaderboard_records(rows)[0]).index(
        f"{({'accuracy', 'bleu'} - {primary}).pop()}_mean")  # the primary metric's columns lead


def test_unscored_cells_keep_their_row_with_status_and_reason(run_dir: Path) -> None:
    """A diverged seed is not averaged in: its row says so, with the stage and step, and ranks last."""
    failure = {"reason": "gpt2/s1/rkl/seed0: train: loss became nan at optimizer step 2", "stage": "gpt2/s1/rkl/seed0: train",
               "stage_key": "abc", "step": 2}
    write_result(run_dir, family="gpt2", student="s1", method="rkl", train_seed=0, rouge={}, em={}, wall_total=0.0,
                 status="diverged", failure=failure)
    rows = build_leaderboard(load_results(run_dir))
    assert [(r.method, r.status) for r in rows if r.family == "gpt2"] == [
        ("teacher", "ok"), ("sft", "ok"), ("kd", "ok"), ("rkl", "diverged")]
    (record,) = [r for r in json.loads(render(rows, "json")) if r["method"] == "rkl"]
    assert record["status"] == "diverged" and record["rougeL_mean"] is None and record["n_train_seeds"] == 0
    assert record["failures"] == [{"seed": 0, "status": "diverged", **failure}]
    assert "diverged (seed 0, step 2, gpt2/s1/rkl/seed0: train)" in render(rows, "md")
    console = Console(file=io.StringIO(), width=300, record=True)
    console.print(rich_table(rows, title="t"))
    assert "diverged (seed 0, step 2" in console.export_text()
    assert all(row.status == "ok" for row in build_leaderboard(load_results(run_dir)) if row.method != "rkl")


def test_json_output_has_required_keys_and_rounding(run_dir: Path) -> None:
    records = json.loads(render(build_leaderboard(load_results(run_dir)), "json"))
    assert len(records) == 4
    required = {"family", "student", "method", "kind", "n_seeds", "n_train_seeds", "wall_seconds",
                "params", "rougeL_mean", "rougeL_std", "exact_match_mean", "exact_match_std"}
    for record in records:
        assert required <= set(record)
    kd = records[3]
    assert kd["method"] == "kd"
    assert kd["rougeL_std"] == round(math.sqrt(20 / 3), 4)
    assert kd["rougeL_mean"] == 43.0


def test_leaderboard_records_match_json_render(run_dir: Path) -> None:
    rows = build_leaderboard(load_results(run_dir))
    assert json.loads(render(rows, "json")) == leaderboard_records(rows)


def test_csv_output_has_header_and_one_line_per_row(run_dir: Path) -> None:
    text = render(build_leaderboard(load_results(run_dir)), "csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 4
    assert parsed[0]["family"] == "bloom"
    assert float(parsed[3]["rougeL_mean"]) == pytest.approx(43.0)
    assert "exact_match_std" in parsed[0]


def test_markdown_output_is_a_table_with_mean_pm_std(run_dir: Path) -> None:
    text = render(build_leaderboard(load_results(run_dir)), "md")
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 4  # header, separator, one per row
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "43.00 ± 2.58" in lines[5]
    assert "50.00 ± 0.00" in lines[3]


def test_render_rejects_unknown_format(run_dir: Path) -> None:
    rows = build_leaderboard(load_results(run_dir))
    with pytest.raises(KdbenchError, match="md, csv, json"):
        render(rows, "html")


def test_rich_table_styles_teacher_and_bolds_best_student(run_dir: Path) -> None:
    rows = build_leaderboard(load_results(run_dir))
    table = rich_table(rows, title="tiny")
    headers = [str(column.header) for column in table.columns]
    assert headers == ["family", "student", "method", "rougeL", "exact_match", "seeds", "steps", "steps total", "selected",
                       "wall s"]  # primary first
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


def test_load_results_rejects_bad_schema_version(run_dir: Path) -> None:
    bad = write_result(run_dir, family="gpt2", student="s1", method="kd", train_seed=7,
                       rouge={"0": 1.0}, em={"0": 1.0}, wall_total=1.0, schema_version=1)
    with pytest.raises(KdbenchError, match="schema_version 1") as info:
        load_results(run_dir)
    assert str(bad) in str(info.value)


def test_load_results_rejects_invalid_json(run_dir: Path) -> None:
    broken = run_dir / "cells" / "gpt2" / "s1" / "kd" / "seed9" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(KdbenchError, match="not valid JSON") as info:
        load_results(run_dir)
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


REFERENCES = sorted(p for p in (Path(__file__).resolve().parents[1] / "results" / "reference").iterdir() if p.is_dir())


@pytest.mark.parametrize("folder", REFERENCES, ids=lambda p: p.name)
def test_committed_references_read_under_the_current_schema(folder: Path) -> None:
    """Every committed reference is remade when the result schema changes: it loads, states its protocol on every
    row, gives equal own-stage steps to its student rows (uniform), and its README names the command that made it."""
    results = load_results(folder)
    rows = build_leaderboard(results)
    assert rows and {row.protocol for row in rows} == {"uniform"}
    for family in {row.family for row in rows}:
        steps = {row.optimizer_steps for row in rows if row.family == family and not row.is_teacher}
        assert len(steps) == 1, (family, steps)
    assert "kdbench run" in (folder / "README.md").read_text()
    assert json.loads((folder / "leaderboard.json").read_text()) == json.loads(render(rows, "json"))
