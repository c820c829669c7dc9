"""The example third-party package, installed as a user would (offline): `kdbench plugins` lists its objective,
its own tests pass with the kit's fixtures, and a tiny run gives it a leaderboard row. Uninstalled afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # installs and runs the example plugin

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kdbench-example-plugin"
DISTRIBUTION = "kdbench-example-plugin"
EXPERIMENT = """
name: example-plugin
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 4}}
init: {training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}
selection: {every: 4}
methods: {sft: {}}
evaluation: {seeds: [10], max_new_tokens: 16, batch_size: 24}
"""


def run(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Callable[..., dict[str, str]]) -> Iterator[Path]:
    """The example, copied out of the work tree (a build writes into its folder) and pip-installed with no
    index, no dependencies and the environment's own setuptools; uninstalled whatever the tests did."""
    copy = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, copy)
    env = subprocess_env()
    done = run("-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index", str(copy), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        yield copy
    finally:
        run("-m", "pip", "uninstall", "-y", "-q", DISTRIBUTION, env=env)


@pytest.mark.slow
def test_kdbench_plugins_lists_the_installed_objective(installed: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    done = run("-m", "kdbench", "plugins", env=subprocess_env(COLUMNS="200"))
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if " jeffreys " in line)
    assert "objective" in row and DISTRIBUTION in row


@pytest.mark.slow
def test_its_own_tests_pass_with_the_kit(installed: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The package's tests use the kit's fixtures, which arrive through kdbench's pytest11 entry point."""
    done = run("-m", "pytest", "-q", "-p", "no:cacheprovider", env=subprocess_env(), cwd=installed)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout


@pytest.mark.slow
def test_a_tiny_run_gives_it_a_leaderboard_row(installed: Path, tmp_path: Path,
                                               subprocess_env: Callable[..., dict[str, str]]) -> None:
    """A method the experiment file does not list runs with its defaults, beside one that it lists."""
    (tmp_path / "example.yaml").write_text(EXPERIMENT)
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="250")  # the leaderboard unwrapped
    out = tmp_path / "out"
    done = run("-m", "kdbench", "run", "--methods", "sft,jeffreys", "--models", "gpt2", "-e", str(tmp_path / "example.yaml"),
               "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jeffreys" in done.stdout
    result = json.loads((out / "cells/gpt2/s1/jeffreys/seed0/result.json").read_text())
    assert result["status"] == "ok" and result["method"] == "jeffreys"
    report = run("-m", "kdbench", "report", str(out), "--format", "json", env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "jeffreys" in {row["method"] for row in json.loads(report.stdout)}
