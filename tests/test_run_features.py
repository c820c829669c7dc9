"""A real `kdbench run` with the paper-scale features switched on, on tiny models: an extra evaluation set
in the MiniLLM release's format with a minimum response length, lm-eval columns from the held-out task,
a method with its own training schedule, and TensorBoard tracking."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kdbench.data import format_prompt
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.zoo import load_tokenizer

pytestmark = pytest.mark.slow  # real runs

EXPERIMENT = """
name: features
protocol: paper
data: {{dataset: tiny, options: {{n_train: 300, n_validation: 10, n_test: 24, list_towns: [3, 5]}},
       max_length: 64, max_prompt_length: 48}}
models: {{scale: tiny, families: [gpt2]}}
teacher: {{training: {{engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 30}}}}
training: {{engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 8}}
methods: {{sft: {{}}, kd: {{}}}}
method_training: {{kd: {{max_steps: 12, lr: 4.0e-3}}}}
evaluation:
  seeds: [10, 20]
  max_new_tokens: 16
  batch_size: 24
  datasets:
    inst: {{dataset: selfinst, options: {{path: {release}}}, min_response_tokens: {min_tokens}}}
  lm_eval: {{tasks: [kdbench_heldout], max_new_tokens: 16, batch_size: 24}}
trackers: [tensorboard]
"""
MIN_TOKENS = 3


def _release_file(folder: Path) -> list[dict]:
    """Tiny-suite test records written as the MiniLLM release writes an evaluation set."""
    records = generate(TinySuiteOptions(n_train=300, n_validation=10, n_test=40, list_towns=(3, 5)))["test"]
    rows = [{"instruction": r["instruction"], "input": r.get("context", ""), "output": r["references"],
             "prompt": format_prompt(r).replace("\n", "<n>")} for r in records]
    folder.mkdir(parents=True)
    (folder / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Callable[..., dict[str, str]]) -> dict:
    root = tmp_path_factory.mktemp("features")
    rows = _release_file(root / "self-inst")
    (root / "features.yaml").write_text(EXPERIMENT.format(release=root / "self-inst", min_tokens=MIN_TOKENS))
    env = subprocess_env(KDBENCH_CACHE_DIR=str(root / "cache"))
    completed = subprocess.run([sys.executable, "-m", "kdbench", "run", "-e", str(root / "features.yaml"), "--out",
                                str(root / "out")], capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = subprocess.run([sys.executable, "-m", "kdbench", "report", str(root / "out"), "--format", "json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0, report.stderr
    results = {m: json.loads((root / f"out/cells/gpt2/{s}/{m}/seed0/result.json").read_text())
               for s, m in (("s1", "sft"), ("s1", "kd"), ("teacher", "teacher"))}
    return {"root": root, "rows": rows, "results": results, "report": json.loads(report.stdout)}


@pytest.mark.slow
def test_extra_evaluation_set_keeps_long_enough_responses_and_gets_its_columns(run: dict) -> None:
    tokenizer = load_tokenizer(str(next((run["root"] / "cache/tokenizer").glob("*/"))))
    expected = sum(len(tokenizer(row["output"][0], add_special_tokens=False)["input_ids"]) >= MIN_TOKENS
                   for row in run["rows"])
    assert 0 < expected < len(run["rows"])  # the filter keeps some and drops some: the check can fail
    for result in run["results"].values():
        assert result["eval_examples_by_dataset"] == {"": 24, "inst": expected}
        assert set(result["metrics"]["inst/rougeL"]) == {"10", "20"}
        assert result["higher_is_better"]["inst/rougeL"] is True
    columns = set(run["report"][0])
    assert {"rougeL_mean", "inst/rougeL_mean", "inst/exact_match_std", "lm_eval/kdbench_heldout/rougeL_mean"} <= columns
    assert all(row["n_seeds"] == 2 for row in run["report"])  # lm-eval's single score does not count as a seed


@pytest.mark.slow
def test_lm_eval_scores_join_every_row(run: dict) -> None:
    for result in run["results"].values():
        scores = result["metrics"]["lm_eval/kdbench_heldout/rougeL"]
        assert list(scores) == ["lm-eval"] and 0.0 <= scores["lm-eval"] <= 100.0
    assert all(row["lm_eval/kdbench_heldout/rougeL_mean"] is not None for row in run["report"])


@pytest.mark.slow
def test_method_training_is_the_methods_own_setting(run: dict) -> None:
    sft, kd = run["results"]["sft"], run["results"]["kd"]
    assert (sft["optimizer_steps"], kd["optimizer_steps"]) == (8, 12)
    assert kd["shared_config_hash"] == sft["shared_config_hash"]  # still compared like with like
    config = json.loads((run["root"] / "out/cells/gpt2/s1/kd/seed0/config.json").read_text())
    assert config["method_training"] == {"max_steps": 12, "lr": 4e-3}


@pytest.mark.slow
def test_tensorboard_logs_each_training_stage(run: dict) -> None:
    tracking = run["root"] / "out" / "tracking"
    for stage in ("gpt2/teacher", "gpt2/s1/sft/seed0", "gpt2/s1/kd/seed0"):
        assert list((tracking / stage).rglob("events.out.tfevents.*")), stage
