"""A real data-parallel run: two CPU processes (gloo) started by `accelerate launch` and by the deepspeed
launcher, each running `kdbench run` on the tiny suite, against the same grid run as one process.

Checks what a multi-process launch must get right: both processes train every cell (twice the data per
optimizer step), generation is split between them, only the main process writes the cache and the
results, exactly one leaderboard is printed, and the leaderboard has the schema of a one-process run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two-process launches

EXPERIMENT = """
name: mp
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24, list_towns: [3, 5]}, max_length: 64,
       max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: deepspeed, zero_stage: 1, lr: 3.0e-3, batch_size: 16, max_steps: 10}}
training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 16, max_steps: 4}
methods: {sft: {}, kd: {}, seqkd: {}}
teacher_generations: {max_new_tokens: 16, batch_size: 100}
evaluation: {seeds: [10, 20], max_new_tokens: 16, batch_size: 24}
"""
BIN = Path(sys.executable).parent
LAUNCHERS = {
    # accelerate's torchrun launcher is behind --multi_gpu; without GPUs kdbench makes it a gloo group.
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdbench"],
    "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--module", "kdbench"],
}


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


# Each launch gets a free rendezvous port: both launchers default to 29500, which anything else on the machine
# (another test run, a lingering socket) may hold.
PORT_OPTIONS = {"accelerate": ["--main_process_port"], "deepspeed": ["--master_port"]}


def _run(command: list[str], root: Path, name: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                                              Path, Path]:
    out, cache = root / f"out-{name}", root / f"cache-{name}"
    env = {**env, "KDBENCH_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    if name in PORT_OPTIONS:
        launcher, module = command[: command.index("kdbench") - 1], command[command.index("kdbench") - 1:]
        command = [*launcher, *PORT_OPTIONS[name], _free_port(), *module]
    completed = subprocess.run([*command, "run", "-e", str(root / "mp.yaml"), "--out", str(out)], capture_output=True,
                               text=True, env=env, timeout=600, cwd=root)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed, out, cache


def _result(out: Path, method: str) -> dict:
    return json.loads((out / f"cells/gpt2/s1/{method}/seed0/result.json").read_text())


def _report(out: Path) -> list[dict]:
    completed = subprocess.run([sys.executable, "-m", "kdbench", "report", str(out), "--format", "json"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Callable[..., dict[str, str]]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mp")
    (root / "mp.yaml").write_text(EXPERIMENT)
    _, out, _ = _run([sys.executable, "-m", "kdbench"], root, "single", subprocess_env())
    return root, out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_train_data_parallel_and_write_once(launcher: str, single: tuple[Path, Path],
                                                          subprocess_env: Callable[..., dict[str, str]]) -> None:
    root, single_out = single
    completed, out, cache = _run(LAUNCHERS[launcher], root, launcher, subprocess_env())

    assert completed.stdout.count("kdbench leaderboard") == 1  # only the main process prints it
    for method in ("sft", "kd", "seqkd"):
        one, two = _result(single_out, method), _result(out, method)
        assert (one["processes"], two["processes"]) == (1, 2)
        assert two["optimizer_steps"] == one["optimizer_steps"] == 4
        # Each process takes its own micro-batch per step: twice the examples per optimizer step.
        assert two["tokens"]["train"] > 1.5 * one["tokens"]["train"]
        assert set(two["metrics"]["rougeL"]) == {"10", "20"}
        assert two["eval_examples"] == one["eval_examples"] == 24  # split between processes, gathered whole
    # The main process alone wrote the cache: one entry per stage, no staging folder left behind.
    assert not list(cache.glob("*/.building-*"))
    assert {p.parent.parent.name for p in cache.glob("*/*/inputs.json")} == {"tokenizer", "init", "tokenize", "train",
                                                                      "generate"}
    assert len(list(cache.glob("train/*/inputs.json"))) == 5  # teacher SFT, the students' SFT init, three students
    generations = json.loads(next(cache.glob("generate/*/generations.json")).read_text())
    assert len(generations) == 300  # both shares of the prompts, gathered in order
    # The leaderboard has exactly the schema of a one-process run.
    rows_one, rows_two = _report(single_out), _report(out)
    assert [sorted(r) for r in rows_two] == [sorted(r) for r in rows_one]
    assert {(r["student"], r["method"]) for r in rows_two} == {(r["student"], r["method"]) for r in rows_one}
