"""No silent hangs (kdbench.runtime): op build locks a killed build left, a stage that stops making progress, and a
launch in which one process fails inside a collective operation.

The lock and watchdog tests use real processes and threads; the end-to-end tests (marked slow) run `kdbench run`
on a small grid: with a stale lock and a held one in its op folder, with an objective that stops making progress,
and as two processes of which one raises mid-step.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from kdbench.runtime.extensions import clear_build_locks, default_extensions_root, extensions_root, lock_holders
from kdbench.runtime.watchdog import StageStalled, progress, watch

HOLD = "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\n" \
       "while not os.path.exists(sys.argv[2]): time.sleep(0.05)\n" \
       "os.close(fd); os.remove(sys.argv[1])"  # what torch's FileBaton does while it builds, until told to stop


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[[Path], tuple[subprocess.Popen[bytes], Path]]]:
    """``holder(lock)``: a live process that holds ``lock`` as a builder does, and the file whose creation tells it
    to let the lock go."""
    started: list[subprocess.Popen[bytes]] = []

    def start(lock: Path) -> tuple[subprocess.Popen[bytes], Path]:
        release = tmp_path / f"release-{len(started)}"
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(release)])
        started.append(process)
        deadline = time.monotonic() + 30
        while not lock_holders(lock):  # until it has the lock open
            assert time.monotonic() < deadline and process.poll() is None, "the holder never took the lock"
            time.sleep(0.05)
        return process, release

    yield start
    for process in started:
        process.kill()
        process.wait()


# -- build locks ------------------------------------------------------------------------------------------------

def test_the_extensions_root_is_torchs_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    assert extensions_root() == default_extensions_root()
    assert default_extensions_root().name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")


def test_a_lock_no_process_holds_is_removed_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "some_op").mkdir()
    (tmp_path / "some_op" / "some_op.so").write_bytes(b"built")
    (tmp_path / "some_op" / "lock").touch()
    messages: list[str] = []
    clear_build_locks(messages.append, tmp_path)
    assert not (tmp_path / "some_op" / "lock").exists()
    assert (tmp_path / "some_op" / "some_op.so").exists()
    assert len(messages) == 1 and "Removed the stale build lock" in messages[0] and str(tmp_path) in messages[0]


def test_a_held_lock_is_waited_on_aloud_until_its_holder_lets_go(
        tmp_path: Path, holder: Callable[[Path], tuple[subprocess.Popen[bytes], Path]]) -> None:
    (tmp_path / "some_op").mkdir()
    lock = tmp_path / "some_op" / "lock"
    process, release = holder(lock)
    threading.Timer(2.0, release.touch).start()
    messages: list[str] = []
    started = time.monotonic()
    clear_build_locks(messages.append, tmp_path, report_every=0.5)
    assert process.wait(timeout=10) == 0  # the holder removed its own lock: nothing here took it away
    assert time.monotonic() - started >= 1.5
    assert len(messages) >= 3, messages  # at once, then every report_every
    assert all(f"held by process {process.pid}" in m and f"rm {lock}" in m for m in messages), messages


def test_a_compiler_working_in_the_op_folder_holds_its_lock(tmp_path: Path) -> None:
    folder = tmp_path / "some_op"
    folder.mkdir()
    (folder / "lock").touch()  # the builder process is gone, but ninja's compiler still runs there
    compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=folder)
    try:
        deadline = time.monotonic() + 30
        while compiler.pid not in lock_holders(folder / "lock"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        compiler.kill()
        compiler.wait()
    clear_build_locks(lambda message: None, tmp_path)
    assert not (folder / "lock").exists()


# -- the watchdog -------------------------------------------------------------------------------------------------

def test_a_silent_stage_is_reported_with_every_threads_stack_and_waited_on(tmp_path: Path) -> None:
    messages: list[str] = []
    log = tmp_path / "logs" / "run.log"
    with watch("gpt2/s1/kd/seed0: train", 0.3, "warn", log, messages.append):
        time.sleep(1.0)  # no progress: reported at 0.3 s and 0.6 s (and perhaps 0.9 s), and not ended
    assert 2 <= len(messages) <= 3, messages
    assert all("gpt2/s1/kd/seed0: train has made no progress" in m and "last: started" in m and str(log) in m
               for m in messages)
    dump = log.read_text()
    assert dump.count("watchdog: gpt2/s1/kd/seed0: train made no progress") == len(messages)
    assert "test_a_silent_stage_is_reported" in dump  # the main thread's stack, where it sleeps
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_progress_keeps_the_watchdog_quiet_and_names_the_last_step(tmp_path: Path) -> None:
    messages: list[str] = []
    with watch("stage", 0.4, "warn", tmp_path / "log", messages.append):
        for step in range(12):
            time.sleep(0.1)
            progress(f"optimizer step {step + 1}")
        assert not messages
        time.sleep(0.6)
    assert messages and "last: optimizer step 12" in messages[0]


def test_under_fail_a_silent_stage_ends_as_stalled(tmp_path: Path) -> None:
    messages: list[str] = []
    started = time.monotonic()
    with pytest.raises(StageStalled, match=r"no progress for 0.3 s .*last: optimizer step 3"):
        with watch("stage", 0.3, "fail", tmp_path / "log", messages.append):
            progress("optimizer step 3")
            time.sleep(30)  # a signal interrupts the sleep
    assert time.monotonic() - started < 5
    assert len(messages) == 1 and "ending the stage as failed" in messages[0]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


# -- end to end -----------------------------------------------------------------------------------------------

PLUGIN = '''
import os
import time

from kdbench import hookimpl
from kdbench.objectives import GOLD, Objective, ObjectiveParams, gold_cross_entropy

CALLS = {"n": 0}


class Stall(Objective):
    """SFT whose second loss stops for a long time (the watchdog test) or raises on rank 1 (the collective test)."""

    name = "stall"
    summary = "sft that stops or fails at its second step"
    paper = "none: a test of kdbench's watchdog"
    Params = ObjectiveParams

    @staticmethod
    def loss(inputs, params):
        CALLS["n"] += 1
        if CALLS["n"] == 2:
            if os.environ.get("KDBENCH_TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
                raise RuntimeError("boom on this rank")
            if os.environ.get("KDBENCH_TEST_STALL"):
                time.sleep(float(os.environ["KDBENCH_TEST_STALL"]))
        gold = inputs[GOLD]
        return gold_cross_entropy(gold.student_logits, gold.labels, gold.mask)


@hookimpl
def kdbench_register_objectives():
    return [Stall]
'''


def write_run(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / "stall.py").write_text(PLUGIN)
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path / "runtime.yaml"


def kdbench_command(tmp_path: Path, prefix: list[str] | None = None) -> list[str]:
    return [*(prefix or [sys.executable, "-m", "kdbench"]), "run", "-e", str(tmp_path / "runtime.yaml"),
            "--plugins-dir", str(tmp_path / "plugins"), "--out", str(tmp_path / "out")]


def run_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    return {**env, "KDBENCH_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def kdbench_run(tmp_path: Path, env: dict[str, str], prefix: list[str] | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kdbench_command(tmp_path, prefix), capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=run_env(tmp_path, env))


def result(tmp_path: Path, method: str) -> dict:
    return json.loads((tmp_path / f"out/cells/gpt2/s1/{method}/seed0/result.json").read_text())


@pytest.mark.slow
def test_a_run_removes_a_stale_lock_beside_a_built_op_and_waits_for_a_held_one(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]], small_experiment: Callable[..., dict],
        holder: Callable[[Path], tuple[subprocess.Popen[bytes], Path]]) -> None:
    built = sorted(extensions_root().glob("*/*.so"))  # this test run's private folder (conftest), op built
    assert built, f"no built op under {extensions_root()}"
    extensions = tmp_path / "extensions"
    shutil.copytree(built[0].parent, extensions / built[0].parent.name)
    stale = extensions / built[0].parent.name / "lock"
    stale.touch()  # as a build killed mid-compile leaves it
    (extensions / "other_op").mkdir()
    held = extensions / "other_op" / "lock"
    process, release = holder(held)
    write_run(tmp_path, small_experiment("runtime", {"sft": {}}, "deepspeed"))
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as sink:
        run = subprocess.Popen(kdbench_command(tmp_path), stdout=subprocess.DEVNULL, stderr=sink, cwd=tmp_path,
                               env=run_env(tmp_path, subprocess_env(TORCH_EXTENSIONS_DIR=str(extensions))))
        try:
            waiting = f"Waiting 0 s for the build lock {held}, held by process {process.pid}"
            deadline = time.monotonic() + 600
            while waiting not in stderr.read_text():
                assert run.poll() is None and time.monotonic() < deadline, stderr.read_text()[-4000:]
                time.sleep(0.2)
            time.sleep(1.0)
            assert run.poll() is None  # still waiting on the held lock
            release.touch()
            assert run.wait(timeout=600) == 0, stderr.read_text()[-4000:]
        finally:
            run.kill()
    assert f"Removed the stale build lock {stale}" in stderr.read_text()
    assert process.wait(timeout=30) == 0 and not stale.exists() and not held.exists()
    assert result(tmp_path, "sft")["status"] == "ok"


@pytest.mark.slow
def test_a_stage_that_stops_making_progress_is_reported_and_failed(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]], small_experiment: Callable[..., dict]) -> None:
    write_run(tmp_path, small_experiment("runtime", {"stall": {}, "sft": {}},
                                         runtime={"stall_seconds": 20, "on_stall": "fail"}))
    started = time.monotonic()
    run = kdbench_run(tmp_path, subprocess_env(KDBENCH_TEST_STALL="600"))
    assert time.monotonic() - started < 300
    assert run.returncode == 1, run.stderr[-4000:]  # a failed cell
    assert re.search(r"watchdog: gpt2/s1/stall/seed0: train has made no progress for 2\d s \(last: optimizer step 1 "
                     r"of 3\); every thread's stack is in .*ending the stage as failed", run.stderr), run.stderr[-4000:]
    stalled = result(tmp_path, "stall")
    assert stalled["status"] == "failed" and stalled["failure"]["reason"].startswith("StageStalled: no progress")
    logs = list((tmp_path / "out" / "logs").glob("*.log"))
    assert len(logs) == 1 and "in loss" in logs[0].read_text()  # the plugin's frame, where it sleeps
    assert result(tmp_path, "sft")["status"] == "ok"  # the grid went on


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow
def test_a_rank_that_raises_mid_step_ends_both_processes_within_the_collective_timeout(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]], small_experiment: Callable[..., dict]) -> None:
    write_run(tmp_path, small_experiment("runtime", {"stall": {}, "sft": {}}, "deepspeed",
                                         runtime={"collective_timeout_seconds": 20}))
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                _free_port(), "-m", "kdbench"]
    started = time.monotonic()
    run = kdbench_run(tmp_path, subprocess_env(KDBENCH_TEST_FAIL_RANK="1"), prefix=launcher, timeout=600)
    seconds = time.monotonic() - started
    assert run.returncode != 0
    said = " ".join(run.stderr.split())  # as rich wraps it
    assert "process 1: RuntimeError: boom on this rank" in said
    assert "failed on some processes of this launch and not on others" in said, run.stderr[-4000:]
    failed = result(tmp_path, "stall")
    assert failed["status"] == "failed" and failed["failure"]["stage"] == "gpt2/s1/stall/seed0: train"
    reason = failed["failure"]["reason"]  # rank 0 waited for rank 1 in a collective until the timeout
    assert "process 1: RuntimeError: boom on this rank" in reason and "process 0: " in reason, reason
    assert "Timed out waiting 20000ms" in reason, reason
    assert seconds < 400, seconds
