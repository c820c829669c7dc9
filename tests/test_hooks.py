"""Every hook a plugin may implement is called by a real run, and every hookspec has a test that implements it.

A plugin file in ``--plugins-dir`` registers a model family, a dataset and a metric of its own and observes the
run's start and end; one tiny real run uses all three and must report through them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import kdbench.hookspecs

pytestmark = pytest.mark.slow  # a real tiny grid through a plugin

TESTS = Path(__file__).parent

PLUGIN = '''
import dataclasses, json, os
from kdbench import Metric, hookimpl
from kdbench.data import DatasetSpec
from kdbench_plugins.datasets import TINY_OPTIONS, load_tiny
from kdbench_plugins.families import GPT2


def _record(**event):
    with open(os.environ["KDBENCH_TEST_EVENTS"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event) + "\\n")


@hookimpl
def kdbench_register_model_families():
    return [dataclasses.replace(GPT2, name="gpt2-twin", description="GPT-2, registered again by a test plugin")]


@hookimpl
def kdbench_register_datasets():
    return [DatasetSpec("tiny-twin", "the tiny suite, registered again by a test plugin", load_tiny, TINY_OPTIONS)]


@hookimpl
def kdbench_register_metrics():
    return [Metric("answered", "1 when the response is not empty", True, lambda response, refs: float(bool(response.strip())))]


@hookimpl
def kdbench_on_run_start(plan):
    _record(hook="run_start", experiment=plan["experiment"], cells=plan["cells"], to_run=plan["to_run"])


@hookimpl
def kdbench_on_run_end(out_dir, seconds):
    _record(hook="run_end", out_dir=out_dir, seconds=seconds)
'''

EXPERIMENT = {
    "name": "hooks",
    "protocol": "uniform",
    "data": {"dataset": "tiny-twin", "options": {"n_train": 120, "n_validation": 8, "n_test": 8, "list_towns": [3, 5]},
             "max_length": 64, "max_prompt_length": 48},
    "models": {"scale": "tiny", "families": ["gpt2-twin"]},
    "init": {"start": "base"},
    "teacher": {"training": {"engine": "accelerate", "lr": 3.0e-3, "batch_size": 8, "max_steps": 2}},
    "training": {"engine": "accelerate", "lr": 5.0e-3, "batch_size": 8, "max_steps": 2},
    "selection": {"every": 2, "metric": "loss"},
    "methods": {"sft": {}},
    "evaluation": {"seeds": [10], "metrics": ["rougeL", "answered"], "max_new_tokens": 8, "batch_size": 8},
}


def hookspec_names() -> list[str]:
    tree = ast.parse(Path(kdbench.hookspecs.__file__).read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("kdbench_")]


def test_every_hookspec_has_a_test_that_implements_or_calls_it() -> None:
    names = hookspec_names()
    assert len(names) >= 11
    others = "\n".join(path.read_text() for path in TESTS.glob("test_*.py") if path.name != Path(__file__).name)
    untested = [name for name in names if name not in others and name not in PLUGIN]
    assert not untested, f"hookspecs no test exercises: {untested}; add a test whose plugin implements them"


def test_a_plugin_registers_a_family_a_dataset_and_a_metric_and_observes_the_run(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "twin.py").write_text(PLUGIN)
    (tmp_path / "hooks.yaml").write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "hooks.yaml"), "--plugins-dir",
         str(tmp_path / "plugins"), "--seeds", "1", "--out", str(out)], capture_output=True, text=True, timeout=900,
        env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), KDBENCH_TEST_EVENTS=str(events),
                           OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(path.read_text()) for path in sorted(out.glob("cells/**/result.json"))]
    assert {(r["family"], r["method"]) for r in results} == {("gpt2-twin", "teacher"), ("gpt2-twin", "sft")}
    for result in results:
        answered = result["metrics"]["answered"]["10"]
        assert 0.0 <= answered <= 100.0 and "rougeL" in result["metrics"]
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert [event["hook"] for event in recorded] == ["run_start", "run_end"]
    start, end = recorded
    assert start["experiment"] == "hooks" and len(start["to_run"]) == len(start["cells"]) == 2
    assert Path(end["out_dir"]).resolve() == out.resolve() and end["seconds"] > 0
