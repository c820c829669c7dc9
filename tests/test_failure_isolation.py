"""Real `kdbench run`s where stages fail: a diverging loss, an objective that raises, a teacher that diverges,
and an objective whose version is bumped. Each cell's fate is decided by its own lineage."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real grids with failing cells

EXPERIMENT = """
name: failures
protocol: uniform
data: {{dataset: tiny, options: {{n_train: 300, n_validation: 10, n_test: 24}}, max_length: 64, max_prompt_length: 48}}
models: {{scale: tiny, families: [gpt2]}}
teacher: {{training: {{engine: deepspeed, lr: {teacher_lr}, batch_size: 32, max_steps: 20}}}}
training: {{engine: deepspeed, lr: 5.0e-3, batch_size: 32, max_steps: 6}}
methods: {{sft: {{}}, kd: {{}}, boom: {{}}, kd-v: {{}}}}
method_training: {{kd: {{lr: 1.0e+30}}}}
evaluation: {{seeds: [10], max_new_tokens: 8, batch_size: 24}}
"""

# An objective that raises, and one (with a sequence source of its own) whose version the tests bump.
PLUGIN = """
import torch
from kdbench import hookimpl
from kdbench.objectives import GOLD, Need
from kdbench.contracts import SequenceSource, Sequences
from kdbench_plugins.kd import KD


class Boom(KD):
    name = "boom"

    @staticmethod
    def loss(inputs, params):
        raise RuntimeError("boom: this objective always fails")


class GoldAgain(SequenceSource):
    name, summary = "gold-again", "the gold sequences under another name"

    def sequences(self, prompts):
        context = self.context
        return Sequences.collate([context.gold[i] for i in prompts], context.pad_id, context.device)


class KDVersioned(KD):
    name, version, reads = "kd-v", {version}, ("gold-again",)

    @staticmethod
    def loss(inputs, params):
        return KD.loss({{GOLD: inputs["gold-again"]}}, params)


@hookimpl
def kdbench_register_objectives():
    return [Boom, KDVersioned]


@hookimpl
def kdbench_register_sequence_sources():
    return [GoldAgain]
"""


def kdbench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failures")
    (root / "plugins").mkdir()
    (root / "plugins" / "objectives.py").write_text(PLUGIN.format(version=1))
    return root


def run(root: Path, env: dict[str, str], methods: str, out: str, teacher_lr: str = "3.0e-3",
        ) -> subprocess.CompletedProcess[str]:
    experiment = root / f"{out}.yaml"
    experiment.write_text(EXPERIMENT.format(teacher_lr=teacher_lr))
    return kdbench("run", "--methods", methods, "-e", str(experiment), "--out", str(root / out), "--plugins-dir",
                   str(root / "plugins"), env=env)


def result(root: Path, out: str, cell: str) -> dict:
    return json.loads((root / out / "cells" / cell / "result.json").read_text())


@pytest.fixture(scope="module")
def first(root: Path, subprocess_env: Callable[..., dict[str, str]]) -> dict:
    env = subprocess_env(KDBENCH_CACHE_DIR=str(root / "cache"), COLUMNS="200")
    completed = run(root, env, "sft,kd,boom,kd-v", "out")
    return {"env": env, "completed": completed}


@pytest.mark.slow
def test_a_diverging_and_a_raising_cell_are_marked_and_the_rest_run(root: Path, first: dict) -> None:
    completed = first["completed"]
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr and "kdbench leaderboard" in completed.stdout
    assert result(root, "out", "gpt2/s1/sft/seed0")["status"] == "ok"
    assert result(root, "out", "gpt2/s1/kd-v/seed0")["status"] == "ok"
    assert result(root, "out", "gpt2/teacher/teacher/seed0")["status"] == "ok"
    kd = result(root, "out", "gpt2/s1/kd/seed0")
    assert kd["status"] == "diverged" and kd["metrics"] == {}
    assert kd["failure"]["stage"] == "gpt2/s1/kd/seed0: train" and kd["failure"]["step"] == 2
    assert "loss became" in kd["failure"]["reason"] and kd["failure"]["stage_key"] in kd["lineage"]
    boom = result(root, "out", "gpt2/s1/boom/seed0")
    assert boom["status"] == "failed" and boom["failure"]["step"] is None
    assert boom["failure"]["reason"] == "RuntimeError: boom: this objective always fails"
    assert "raise RuntimeError" in boom["failure"]["traceback"]
    for line in ("diverged: gpt2/s1/kd/seed0", "failed: gpt2/s1/boom/seed0"):
        assert line in completed.stderr

    report = kdbench("report", str(root / "out"), "--format", "json", env=first["env"])
    assert report.returncode == 0, report.stderr
    rows = {row["method"]: row for row in json.loads(report.stdout)}
    assert rows["kd"]["status"] == "diverged" and rows["kd"]["failures"][0]["step"] == 2
    assert rows["boom"]["status"] == "failed" and rows["kd"]["rougeL_mean"] is None
    assert rows["sft"]["status"] == "ok" and rows["sft"]["rougeL_mean"] is not None
    # A terminal wide enough for the whole table: at 80 columns rich wraps the status cell over several lines.
    table = kdbench("report", str(root / "out"), env={**first["env"], "COLUMNS": "400"})
    assert "diverged (seed 0, step 2" in table.stdout


@pytest.mark.slow
def test_a_second_run_retries_only_the_cells_that_failed(root: Path, first: dict) -> None:
    stamps = {cell: (root / "out/cells" / cell / "result.json").stat().st_mtime_ns
              for cell in ("gpt2/s1/sft/seed0", "gpt2/s1/kd-v/seed0", "gpt2/teacher/teacher/seed0", "gpt2/s1/kd/seed0")}
    completed = run(root, first["env"], "sft,kd,boom,kd-v", "out")
    assert completed.returncode == 1
    assert "2 of 5 cells to run" in completed.stderr
    for cell, stamp in stamps.items():
        rewritten = (root / "out/cells" / cell / "result.json").stat().st_mtime_ns != stamp
        assert rewritten == cell.endswith("kd/seed0"), cell


@pytest.mark.slow
def test_a_diverging_teacher_fails_exactly_the_cells_built_on_it(root: Path, first: dict) -> None:
    completed = run(root, first["env"], "sft,kd-v", "out-teacher", teacher_lr="1.0e+30")
    assert completed.returncode == 1, completed.stderr[-3000:]
    for cell in ("gpt2/teacher/teacher/seed0", "gpt2/s1/kd-v/seed0"):
        failed = result(root, "out-teacher", cell)
        assert failed["status"] == "diverged" and failed["failure"]["stage"] == "gpt2/teacher: train", cell
    assert result(root, "out-teacher", "gpt2/s1/sft/seed0")["status"] == "ok"  # sft never reads the teacher


@pytest.mark.slow
def test_bumping_an_objectives_version_retrains_exactly_its_cell(root: Path, first: dict) -> None:
    before = {path.parent.name for path in (root / "cache").glob("*/*/inputs.json")}
    stamps = {path: path.stat().st_mtime_ns for path in (root / "out").glob("cells/**/result.json")}
    assert result(root, "out", "gpt2/s1/kd-v/seed0")["versions"]["objectives"]["kd-v"] == 1
    (root / "plugins" / "objectives.py").write_text(PLUGIN.format(version=2))
    completed = run(root, first["env"], "sft,kd-v", "out")
    assert completed.returncode == 0, completed.stderr[-3000:]
    new = {path.parent for path in (root / "cache").glob("*/*/inputs.json") if path.parent.name not in before}
    assert [json.loads((path / "inputs.json").read_text())["label"] for path in new] == ["gpt2/s1/kd-v/seed0"]
    kd_v = result(root, "out", "gpt2/s1/kd-v/seed0")
    assert kd_v["versions"]["objectives"]["kd-v"] == 2 and kd_v["versions"]["sources"]["gold-again"] == 1
    for path, stamp in stamps.items():
        rewritten = path.stat().st_mtime_ns != stamp
        assert rewritten == ("kd-v" in str(path)), path


@pytest.mark.slow
def test_a_cell_whose_files_a_report_cannot_read_is_run_again_to_the_same_numbers(root: Path, first: dict) -> None:
    """One rule for "finished": a result of another schema, or a scored cell without its per-example scores, is
    what the report leaves out, so the run scores it again (from the cached stages, to the same numbers)."""
    before = {cell: result(root, "out", cell) for cell in ("gpt2/s1/sft/seed0", "gpt2/teacher/teacher/seed0")}
    grid = json.loads((root / "out" / "grid.json").read_text())["cells"]  # recorded as the first run started
    assert {"gpt2/s1/sft/seed0", "gpt2/s1/boom/seed0", "gpt2/teacher/teacher/seed0"} <= set(grid)
    (root / "out/cells/gpt2/s1/sft/seed0/examples.json").unlink()
    teacher = root / "out/cells/gpt2/teacher/teacher/seed0/result.json"
    teacher.write_text(json.dumps({**before["gpt2/teacher/teacher/seed0"], "schema_version": 1}))
    report = kdbench("report", str(root / "out"), "--format", "json", env=first["env"])
    assert report.returncode == 0, report.stderr  # the readable rows, and a note for each left out
    said = " ".join(report.stderr.split())
    assert "cell gpt2/s1/sft/seed0 is left out" in said and "cell gpt2/teacher/teacher/seed0 is left out" in said
    assert {row["method"] for row in json.loads(report.stdout)} >= {"kd", "boom"}

    completed = run(root, first["env"], "sft", "out")
    assert completed.returncode == 0, completed.stderr[-3000:]
    said = " ".join(completed.stderr.split())
    assert "gpt2/s1/sft/seed0: running it again, since its results cannot be read:" in said and "is missing" in said
    assert "gpt2/teacher/teacher/seed0: running it again" in said and "schema_version 1" in said
    for cell, earlier in before.items():
        again = result(root, "out", cell)
        assert again["schema_version"] == earlier["schema_version"] and again["metrics"] == earlier["metrics"], cell
