"""``kdbench run --workers N``: N one-thread processes on one cache and results folder give the numbers of one
one-thread process, bit for bit, and the command that starts them prints the leaderboard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdbench.grid.workers import worker_arguments


@pytest.mark.parametrize("arguments", [
    ["run", "--workers", "2", "--seeds", "1"],
    ["run", "--seeds", "1", "--workers=2"],
    ["run", "--seeds", "1"],
])
def test_a_worker_runs_the_same_command_without_workers(arguments: list[str]) -> None:
    assert worker_arguments(arguments) == ["run", "--seeds", "1"]


def run_command(tmp_path: Path, name: str, small_experiment: Callable[..., dict[str, Any]]) -> list[str]:
    """``kdbench run`` of a small sft + kd grid, written to ``tmp_path``, without its ``--out``."""
    experiment = tmp_path / f"{name}.yaml"
    experiment.write_text(yaml.safe_dump(small_experiment(name, {"sft": {}, "kd": {}}), sort_keys=False))
    return [sys.executable, "-m", "kdbench", "run", "-e", str(experiment)]


def metrics(out: Path) -> dict[str, Any]:
    return {str(path.parent.relative_to(out)): json.loads(path.read_text())["metrics"]
            for path in sorted(out.glob("cells/**/result.json"))}


@pytest.mark.slow
def test_two_workers_give_one_one_thread_process_numbers_and_the_leaderboard(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]],
        small_experiment: Callable[..., dict[str, Any]]) -> None:
    base = run_command(tmp_path, "workers", small_experiment)
    single = subprocess.run([*base, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=900,
                            env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache-one"), OMP_NUM_THREADS="1"))
    assert single.returncode == 0, single.stderr[-3000:]
    both = subprocess.run([*base, "--out", str(tmp_path / "two"), "--workers", "2"], capture_output=True, text=True,
                          timeout=900, env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache-two")))
    assert both.returncode == 0, both.stderr[-3000:]
    assert "running the grid as 2 workers of one thread each" in both.stderr
    assert both.stdout.count("kdbench leaderboard: workers") == 1  # printed once, by the command, not by each worker
    got, want = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert sorted(got) == sorted(want) and len(got) == 3
    assert got == want


@pytest.mark.slow
def test_a_stop_signal_reaches_every_worker_and_the_same_command_finishes(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]],
        small_experiment: Callable[..., dict[str, Any]]) -> None:
    command = [*run_command(tmp_path, "stopped", small_experiment), "--out", str(tmp_path / "out"), "--workers", "2"]
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"))
    log = tmp_path / "stderr.log"  # a file, not a pipe: the workers share it, and a pipe stays open while they run
    with log.open("w") as stderr:
        parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not any((tmp_path / "cache").glob("*/*")) and time.monotonic() < deadline:  # the workers are building
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=300) == 143, log.read_text()[-3000:]
    # The command ended only once its workers had: none is left running.
    workers = subprocess.run(["pgrep", "-f", str(tmp_path / "stopped.yaml")], capture_output=True, text=True).stdout.split()
    assert workers == []
    assert "Traceback" not in log.read_text()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(metrics(tmp_path / "out")) == 3
