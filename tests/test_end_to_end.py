"""One real run of the whole harness, as a user runs it: the `kdbench` command on tiny models.

The dry run's stage graph first, then tokenizer training, model building, teacher SFT and student
training through DeepSpeed, sampled generation, ROUGE-L / exact match, result files and the report,
then a second run that must reuse the cache and the finished cells instead of training again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.slow  # real tiny grids end to end

EXPERIMENT = """
name: e2e
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2, opt]}
teacher: {training: {engine: deepspeed, zero_stage: 1, lr: 3.0e-3, batch_size: 32, max_steps: 30}}
init: {training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 32, max_steps: 6}}
training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 32, max_steps: 8}
selection: {every: 4}
methods: {sft: {}, kd: {kd_ratio: 0.5}, seqkd: {}, dpkd-token: {beta: 0.1}, dpkd: {}, minillm: {rollout_batches: 2}}
teacher_generations: {max_new_tokens: 16, batch_size: 100}
evaluation: {seeds: [10, 20], max_new_tokens: 16, batch_size: 24}
"""

# A third-party objective that asks to start from the SFT student: under the paper protocol the runner
# must train it from the SFT init (selected by validation loss), and the other methods from the base model.
SFT_INIT_PLUGIN = """
from kdbench import hookimpl
from kdbench.objectives import Need
from kdbench_plugins.kd import KD


class KDFromSFT(KD):
    name = "kd-from-sft"
    needs = KD.needs | {Need.SFT_INIT}


@hookimpl
def kdbench_register_objectives():
    return [KDFromSFT]
"""
METHODS = "sft,kd,seqkd,dpkd-token,dpkd,minillm"

KDBENCH = [sys.executable, "-m", "kdbench"]


def kdbench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KDBENCH, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Callable[..., dict[str, str]]) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    (root / "e2e.yaml").write_text(EXPERIMENT)
    env = subprocess_env(KDBENCH_CACHE_DIR=str(root / "cache"))
    args = ("run", "--methods", METHODS, "--models", "gpt2,opt", "-e", str(root / "e2e.yaml"), "--out", str(root / "out"))
    planned = kdbench(*args, "--dry-run", "--format", "json", env=env)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert not (root / "cache").exists()  # the plan builds nothing
    completed = kdbench(*args, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"root": root, "env": env, "args": args, "completed": completed, "plan": json.loads(planned.stdout)}


def test_the_run_builds_exactly_the_planned_graph(first_run: dict) -> None:
    """Collect, then run: every cell's lineage is exactly its stages in the dry run's graph, and every
    cache entry the run built was planned, under the planned key."""
    plan, root = first_run["plan"], first_run["root"]
    stages = {stage["key"]: stage for stage in plan["stages"]}
    assert len(stages) == len(plan["stages"])  # one node per key
    for stage in plan["stages"]:
        assert set(stage["deps"]) <= set(stages) and {"key", "kind", "label", "deps"} <= set(stage)
    cells = {cell["label"]: cell for cell in plan["cells"]}
    results = {path.parent.relative_to(root / "out/cells").as_posix(): json.loads(path.read_text())
               for path in (root / "out").glob("cells/**/result.json")}
    assert set(cells) == set(results)
    for label, result in results.items():
        assert result["key"] == cells[label]["key"] and result["lineage"] == cells[label]["lineage"]
        kinds = {stages[key]["kind"] for key in result["lineage"]}
        assert {"tokenizer", "init", "tokenize", "eval"} <= kinds
        assert set(result["versions"]["stages"]) == kinds
    built = {(p.parent.parent.name, p.parent.name) for p in (root / "cache").glob("*/*/inputs.json")}
    assert built and {key for _, key in built} <= set(stages)
    assert all(stages[key]["kind"] == kind for kind, key in built)
    # and every planned stage that has an entry of its own was built
    assert {key for key, stage in stages.items() if stage["kind"] not in ("eval", "checkpoint")} == {k for _, k in built}


def test_run_writes_a_result_per_cell_and_prints_the_leaderboard(first_run: dict) -> None:
    out = first_run["root"] / "out"
    results = sorted(out.glob("cells/**/result.json"))
    # 2 families × (teacher + 1 student × 6 methods)
    assert len(results) == 14
    for path in results:
        result = json.loads(path.read_text())
        assert result["schema_version"] == 4 and result["status"] == "ok" and result["protocol"] == "uniform"
        examples = json.loads((path.parent / "examples.json").read_text())  # every example's scores, the teacher's too
        assert set(examples["sets"][""]["scores"]["rougeL"]) == {"10", "20"}
        assert set(result["metrics"]) == {"rougeL", "exact_match"}
        assert set(result["metrics"]["rougeL"]) == {"10", "20"}
        assert all(0.0 <= v <= 100.0 for v in result["metrics"]["rougeL"].values())
        assert (path.parent / "config.json").is_file() and len(result["config_hash"]) == 16
    kd = json.loads((out / "cells/gpt2/s1/kd/seed0/result.json").read_text())
    sft = json.loads((out / "cells/gpt2/s1/sft/seed0/result.json").read_text())
    assert kd["forward_passes"]["teacher"] == 8 and sft["forward_passes"]["teacher"] == 0
    assert kd["shared_config_hash"] == sft["shared_config_hash"]  # like is compared with like
    assert kd["config_hash"] != sft["config_hash"]
    assert kd["params"]["teacher"] > 10 * kd["params"]["student"]
    assert "leaderboard" in first_run["completed"].stdout


def test_report_json_has_one_row_per_family_student_method(first_run: dict) -> None:
    completed = kdbench("report", str(first_run["root"] / "out"), "--format", "json", env=first_run["env"])
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)
    keys = {(r["family"], r["student"], r["method"]) for r in rows}
    methods = ("teacher", *METHODS.split(","))
    assert keys == {(f, "teacher" if m == "teacher" else "s1", m) for f in ("gpt2", "opt") for m in methods}
    for row in rows:
        for key in ("rougeL_mean", "rougeL_std", "exact_match_mean", "n_seeds", "wall_seconds"):
            assert key in row
        assert row["n_seeds"] == 2 and row["wall_seconds"] > 0


def test_seqkd_trains_on_stored_teacher_generations(first_run: dict) -> None:
    """One generation entry per family teacher, read by seqkd; its cell records no teacher forward
    (the teacher's text is data) while dpkd-token runs the teacher on every micro-batch."""
    root = first_run["root"]
    entries = sorted((root / "cache" / "generate").iterdir())
    assert len(entries) == 2
    generations = json.loads((entries[0] / "generations.json").read_text())
    assert len(generations) == 300 and sum(bool(g) for g in generations) > 150
    seqkd = json.loads((root / "out/cells/gpt2/s1/seqkd/seed0/result.json").read_text())
    dpkd_token = json.loads((root / "out/cells/gpt2/s1/dpkd-token/seed0/result.json").read_text())
    assert seqkd["forward_passes"]["teacher"] == 0 and seqkd["forward_passes"]["student"] == 16  # gold + teacher text
    assert dpkd_token["forward_passes"]["teacher"] == 8


def test_uniform_rows_start_alike_train_alike_and_report_their_cost(first_run: dict) -> None:
    """Under uniform every method, sft included, continues from the one SFT init of its family and seed (selected
    by validation loss), trains the same optimizer steps on the same number of sequences, is selected on validation
    ROUGE-L, and reports its own cost and its ancestors' (init, teacher) apart and summed."""
    root = first_run["root"]
    entries = {p.name: json.loads((p / "inputs.json").read_text()) for p in (root / "cache" / "train").iterdir()}
    inits = {e["family"]: e for e in entries.values() if e["inputs"]["training"]["max_steps"] == 6}
    assert {e["inputs"]["selection"]["metric"] for e in inits.values()} == {"loss"} and len(inits) == 2
    by_objective = {(e["inputs"]["objective"]["name"], e["family"]): e for e in entries.values()
                    if e["inputs"]["training"]["max_steps"] == 8}
    for (method, family), entry in by_objective.items():
        assert entry["roles"]["init"] == inits[family]["key"], method
    for family in ("gpt2", "opt"):
        results = [json.loads(p.read_text()) for p in (root / "out/cells" / family / "s1").glob("*/seed0/result.json")]
        assert len(results) == 6
        assert {r["optimizer_steps"] for r in results} == {8}
        # the same prompts in the same order (minillm's prompts come in rollout groups: same count, not the same ones)
        assert {r["cost"]["own"]["examples"] for r in results} == {8 * 32}
        assert len({r["cost"]["own"]["tokens"] for r in results if r["method"] != "minillm"}) == 1
        for r in results:
            ancestors = r["cost"]["ancestors"]
            assert ancestors[f"{family}/s1/init/seed0"]["optimizer_steps"] == 6
            uses_teacher = f"{family}/teacher" in ancestors
            assert uses_teacher == (r["method"] != "sft") and (not uses_teacher or
                                                                ancestors[f"{family}/teacher"]["optimizer_steps"] == 30)
            assert r["optimizer_steps_total"] == 8 + 6 + (30 if uses_teacher else 0) == r["cost"]["total"]["optimizer_steps"]
            assert r["validation"]["metric"] == "rougeL" and [p["step"] for p in r["validation"]["curve"]] == [4, 8]
            best = max(r["validation"]["curve"], key=lambda p: p["value"])  # the first of equals
            assert r["selected_step"] == best["step"]
            assert r["protocol_card"]["protocol"] == "uniform" and "validation loss" in r["protocol_card"]["init"]


def test_on_policy_methods_sample_the_student(first_run: dict) -> None:
    """dpkd samples the student on every micro-batch; minillm once per collection, reused for inner epochs."""
    root = first_run["root"]
    entries = {p.name: json.loads((p / "inputs.json").read_text()) for p in (root / "cache" / "train").iterdir()}
    by_objective = {(e["inputs"]["objective"]["name"], e["family"]): e for e in entries.values()
                    if e["inputs"]["training"]["max_steps"] == 8}
    # one sample per prompt of every micro-batch (dpkd: 8 of them), or per prompt of the one collection
    # of 2 micro-batches that minillm reuses for 4 inner epochs; one micro-batch may be the short last one
    for method, batches in (("dpkd", 8), ("minillm", 2)):
        stats = json.loads((root / f"out/cells/opt/s1/{method}/seed0/train_log.jsonl").read_text().splitlines()[-1])
        assert stats["step"] == 8
        train_stats = [p for p in (root / "cache" / "train").iterdir() if by_objective[(method, "opt")] == entries[p.name]]
        samples = json.loads((train_stats[0] / "train_stats.json").read_text())["student_samples"]
        assert (batches - 1) * 32 + 300 % 32 <= samples <= batches * 32


def test_sft_init_objective_starts_from_the_sft_student(first_run: dict) -> None:
    root = first_run["root"]
    (root / "plugins").mkdir()
    (root / "plugins" / "kd_from_sft.py").write_text(SFT_INIT_PLUGIN)
    (root / "paper.yaml").write_text(EXPERIMENT.replace("protocol: uniform", "protocol: paper"))
    args = ("run", "--methods", "kd-from-sft,kd", "--models", "gpt2", "-e", str(root / "paper.yaml"),
            "--out", str(root / "out-sft-init"), "--plugins-dir", str(root / "plugins"))
    completed = kdbench(*args, env=first_run["env"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    entries = [json.loads((p / "inputs.json").read_text()) for p in (root / "cache" / "train").iterdir()]
    new = [e for e in entries if e["inputs"]["objective"]["name"] == "kd-from-sft"]
    # the gpt2 student's SFT init, which the uniform run built (the teachers' SFT runs 30 steps, the init 6)
    init = [e for e in entries if e["inputs"]["objective"]["name"] == "sft" and e["family"] == "gpt2"
            and e["inputs"]["training"]["max_steps"] == 6]
    assert len(new) == 1 and len(init) == 1
    assert new[0]["roles"]["init"] == init[0]["key"]  # initialised from exactly the shared SFT init
    kd = json.loads((root / "out-sft-init/cells/gpt2/s1/kd/seed0/result.json").read_text())
    assert kd["protocol"] == "paper" and "gpt2/s1/init/seed0" not in kd["cost"]["ancestors"]  # kd's recipe: the base model


def test_second_run_reuses_teacher_and_finished_cells(first_run: dict) -> None:
    root = first_run["root"]
    trained_before = sorted(p.name for p in (root / "cache" / "train").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in (root / "out").glob("cells/**/result.json")}
    (root / "out/cells/opt/s1/kd/seed0/result.json").unlink()  # as if the run had been killed there
    completed = kdbench(*first_run["args"], env=first_run["env"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(p.name for p in (root / "cache" / "train").iterdir()) == trained_before  # nothing retrained
    for path, stamp in stamps.items():
        if "opt/s1/kd" not in str(path):
            assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    assert (root / "out/cells/opt/s1/kd/seed0/result.json").is_file()


def test_user_errors_exit_2_without_traceback(first_run: dict) -> None:
    completed = kdbench("run", "--methods", "kdd", "-e", str(first_run["root"] / "e2e.yaml"), env=first_run["env"])
    assert completed.returncode == 2
    assert "did you mean 'kd'" in completed.stderr.lower() and "Traceback" not in completed.stderr
    completed = kdbench("report", str(first_run["root"] / "nowhere"), env=first_run["env"])
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
