"""SIGINT and SIGTERM stop a run cleanly (kdbench.runtime.signals): the handlers with real signals sent to this
process, then a real `kdbench run` stopped mid-training by Ctrl-C's SIGINT and by SIGTERM and run again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from kdbench.runtime.signals import Stopped, stopping_on_signals


@pytest.fixture
def heard() -> Iterator[None]:
    """Both signals at Python's defaults, as in a terminal: a background job of a non-interactive shell (`pytest &`
    in a script) starts with SIGINT ignored, which stopping_on_signals rightly leaves alone."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.mark.usefixtures("heard")
def test_a_stop_signal_raises_stopped_with_the_shells_exit_code_and_the_handlers_come_back() -> None:
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, exit_code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with pytest.raises(Stopped) as stopped, stopping_on_signals():
            os.kill(os.getpid(), number)
            time.sleep(10)  # the handler runs before this sleep can end
        assert stopped.value.signal is number and stopped.value.exit_code == exit_code
    assert {number: signal.getsignal(number) for number in before} == before


@pytest.mark.usefixtures("heard")
def test_a_second_signal_does_not_cut_the_first_ones_cleanup_short() -> None:
    cleaned: list[bool] = []
    with pytest.raises(Stopped) as stopped, stopping_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # while the first one unwinds
            cleaned.append(True)
    assert stopped.value.signal is signal.SIGINT and cleaned == [True]


def test_a_signal_ignored_from_the_start_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stopping_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- a real `kdbench run` --------------------------------------------------------------------------------------

EXPERIMENT = {
    "name": "signals",
    "protocol": "uniform",
    "data": {"dataset": "tiny", "options": {"n_train": 120, "n_validation": 8, "n_test": 8}, "max_length": 64,
             "max_prompt_length": 48},
    "models": {"scale": "tiny", "families": ["gpt2"]},
    "init": {"start": "base"},
    "teacher": {"training": {"engine": "accelerate", "lr": 3.0e-3, "batch_size": 8, "max_steps": 2}},
    # long enough that each signal lands inside the student's training, which checkpoints every second step
    "training": {"engine": "accelerate", "lr": 5.0e-3, "batch_size": 8, "max_steps": 200},
    "selection": {"every": 200, "metric": "loss"},
    "checkpoint_every": 2,
    "methods": {"sft": {}},
    "evaluation": {"seeds": [10], "max_new_tokens": 8, "batch_size": 8},
}
STOPPED = re.compile(r"^kdbench: stopped by (Ctrl-C \(SIGINT\)|SIGTERM)\. What finished is kept .* run the same "
                     r"command again to go on from there\.$")


def latest_checkpoint_step(cache: Path) -> int:
    """The highest optimizer step of any resume checkpoint in the cache; 0 when there is none."""
    steps = [int(folder.name.removeprefix("step-")) for folder in (cache / ".resume" / "train").glob("*/step-*")]
    return max(steps, default=0)


def run_until(command: list[str], env: dict[str, str], log: Path, number: signal.Signals,
              ready: Callable[[], bool]) -> int:
    """Run ``command`` and send it ``number`` as soon as ``ready()`` holds; its exit status. Output goes to ``log``:
    a pipe nobody reads while the run goes on could fill up and stall it."""
    # As a terminal's foreground process it hears SIGINT: a test session started in the background of a shell
    # ignores SIGINT, and a child would inherit that (and rightly keep it, as nohup's children do).
    with log.open("w") as output, subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=output,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as run:
        deadline = time.monotonic() + 600
        while not ready():
            assert run.poll() is None, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the point to stop it"
            time.sleep(0.01)
        run.send_signal(number)
        return run.wait(timeout=300)


@pytest.mark.slow
def test_a_run_stopped_by_sigint_then_by_sigterm_keeps_its_checkpoints_and_the_same_command_finishes(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """Each stop: the shell's exit code (130, 143), one last line saying how to go on, no staging folder left in
    the cache, the interrupted stage's resume checkpoints kept. The third run of the same command continues from
    them (its training stage records both resumptions) and scores every cell."""
    (tmp_path / "signals.yaml").write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    cache, out = tmp_path / "cache", tmp_path / "out"
    command = [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "signals.yaml"), "--out", str(out)]
    env = subprocess_env(KDBENCH_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    stopped_at = []
    for number in (signal.SIGINT, signal.SIGTERM):
        before = latest_checkpoint_step(cache)
        log = tmp_path / f"{number.name}.log"
        status = run_until(command, env, log, number, lambda: latest_checkpoint_step(cache) >= before + 4)
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        assert status == 128 + number, log.read_text()[-3000:]
        assert STOPPED.match(lines[-1]), lines[-3:]
        assert number.name in lines[-1]
        assert not list(cache.glob("*/.building-*")), "a staging folder was left in the cache"
        stopped_at.append(latest_checkpoint_step(cache))
        assert stopped_at[-1] >= before + 4  # the interrupted stage's checkpoints are kept for the next run
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((out / "cells/gpt2/s1/sft/seed0/result.json").read_text())
    assert result["status"] == "ok"
    student = next(folder for folder in (cache / "train").iterdir()
                   if json.loads((folder / "train_stats.json").read_text())["steps"] == 200)
    resumed_at = json.loads((student / "train_stats.json").read_text())["resumed_at"]
    assert len(resumed_at) == 2 and resumed_at[0] < resumed_at[1] <= stopped_at[1]
    assert not any((cache / ".resume" / "train").iterdir())  # discarded once the stage was published
