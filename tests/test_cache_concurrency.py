"""Many workers on one cache and one results folder: files published whole and readable, one builder per
cache key (a second worker waits, then reuses the entry), a killed worker's lock taken over, a report that
reads only finished cells, and two real `kdbench run`s started together that build every node once.

Other workers here are real processes (a lock held in-process could not show what another process sees)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.grid.cache import StageCache
from kdbench.report.folder import cells_in_progress, load_folder, load_results
from kdbench.results import store

# A worker that takes a lock and keeps it until it is killed.
HOLD_LOCK = """
import sys, time
from pathlib import Path
from kdbench.results.store import FileLock
FileLock(Path(sys.argv[1]), "the test's key").acquire()
print("held", flush=True)
time.sleep(600)
"""

# A worker that builds a cache entry, and finishes its build only once the file argv[2] exists.
BUILD_ENTRY = """
import os, sys, time
from pathlib import Path
from kdbench.grid.cache import StageCache

root, go = Path(sys.argv[1]), Path(sys.argv[2])

def build(folder):
    (folder / "made_by").write_text(str(os.getpid()))
    print("building", flush=True)
    while not go.exists():
        time.sleep(0.05)

path, cached = StageCache(root).get_or_build("tokenizer", "k1", {"by": "child"}, build)
print("reused" if cached else "built", flush=True)
"""


def start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture()
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes a test starts; whatever is still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a thread: its answer (or error) lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001  (handed to the test)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# -- atomic writes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store.atomic_write_text(tmp_path / "a.txt", "text")
        store.atomic_write_json(tmp_path / "b.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("text")  # what open() gives under this umask
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "plain.txt"]  # no temporary left


def test_a_published_entry_is_never_replaced(tmp_path: Path) -> None:
    """Two workers that both built a key (a filesystem without locks): the first entry stays whole."""
    final = tmp_path / "tokenizer" / "k1"
    final.mkdir(parents=True)
    (final / "inputs.json").write_text("{}")
    (final / "made_by").write_text("first")
    staging = tmp_path / "tokenizer" / ".building-k1-host-1"
    staging.mkdir()
    (staging / "inputs.json").write_text("{}")
    (staging / "made_by").write_text("second")
    StageCache._publish(staging, final)
    assert (final / "made_by").read_text() == "first"
    # An unfinished folder without inputs.json (kdbench before staging folders) is replaced.
    (final / "inputs.json").unlink()
    StageCache._publish(staging, final)
    assert (final / "made_by").read_text() == "second" and (final / "inputs.json").is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == ["k1"]


# -- one builder per key ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_worker_waits_for_the_builder_then_reuses_its_entry(
        tmp_path: Path, children: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]) -> None:
    go = tmp_path / "go"
    builder = start(BUILD_ENTRY, str(tmp_path), str(go))
    children.append(builder)
    assert builder.stdout is not None and builder.stdout.readline().strip() == "building"
    built: list[Path] = []
    cache = StageCache(tmp_path)
    thread, outcome = in_thread(lambda: cache.get_or_build("tokenizer", "k1", {"by": "test"}, built.append))
    time.sleep(1.5)
    assert thread.is_alive() and not built  # it waits: the other worker holds the key
    go.touch()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["value"] == (tmp_path / "tokenizer" / "k1", True)  # reused
    assert not built
    assert (tmp_path / "tokenizer" / "k1" / "made_by").read_text() == str(builder.pid)
    assert builder.stdout.readline().strip() == "built" and builder.wait(60) == 0
    waiting = capsys.readouterr().err
    assert "waiting for the tokenizer stage k1" in waiting and f"pid {builder.pid} on " in waiting
    assert store.lock_owner(cache.lock_path("tokenizer", "k1")) is None  # released, and says so


def test_a_killed_workers_lock_is_taken_over(tmp_path: Path, children: list[subprocess.Popen[str]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cache = StageCache(tmp_path)
    lock = cache.lock_path("train", "k2")
    holder = start(HOLD_LOCK, str(lock))
    children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    leftover = tmp_path / "train" / f".building-k2-{store.host()}-{holder.pid}"  # what it had built so far
    leftover.mkdir(parents=True)
    built: list[Path] = []

    def build(folder: Path) -> None:
        built.append(folder)
        (folder / "weights").write_text("w")

    thread, outcome = in_thread(lambda: cache.get_or_build("train", "k2", {"by": "test"}, build))
    time.sleep(1.5)
    assert thread.is_alive() and not built  # the lock of a live holder is respected
    owner = store.lock_owner(lock)
    assert owner is not None and owner["pid"] == holder.pid and owner["host"] == store.host()
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(30) == -signal.SIGKILL
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["value"] == (tmp_path / "train" / "k2", False) and len(built) == 1
    assert (tmp_path / "train" / "k2" / "weights").read_text() == "w"
    assert not leftover.exists()  # the killed worker's staging folder is cleared
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["k2"]
    assert f"pid {holder.pid} on " in capsys.readouterr().err


def test_without_file_locks_the_run_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A filesystem that cannot lock (Lustre without -o flock): one warning, and the entry is still built."""
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache = StageCache(tmp_path / "nolocks")
    for key in ("a", "b"):
        path, cached = cache.get_or_build("init", key, {}, lambda folder: (folder / "w").write_text("w"))
        assert not cached and (path / "w").is_file()
    err = capsys.readouterr().err
    assert err.count("cannot lock files") == 1 and "-o flock" in err


def test_a_lock_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / ".locks").write_text("a file where the lock folder goes")
    with pytest.raises(KdbenchError, match="Cannot create the lock file"):
        StageCache(tmp_path).get_or_build("init", "k", {}, lambda folder: None)


# -- reports during a run --------------------------------------------------------------------------------------

def test_a_cell_being_evaluated_is_in_progress_until_its_worker_dies(
        tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    cell = store.cell_dir(tmp_path, "gpt2", "s1", "kd", 0)
    holder = start(HOLD_LOCK, str(store.cell_lock(cell)))
    children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert cells_in_progress(tmp_path) == [cell]
    with pytest.raises(KdbenchError, match="1 cells are being evaluated now"):
        load_results(tmp_path)
    holder.kill()
    holder.wait(30)
    assert cells_in_progress(tmp_path) == []


# -- two real runs on one cache and one results folder -----------------------------------------------------------

EXPERIMENT = """
name: shared
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 10}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}
methods: {sft: {}, kd: {}}
evaluation: {seeds: [10], max_new_tokens: 8, batch_size: 24}
"""

# An observer plugin: every stage's end (built or reused) and every cell a process evaluated, one line each.
OBSERVER = """
import json, os
from kdbench import hookimpl


def _record(**event):
    with open(os.environ["KDBENCH_TEST_EVENTS"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event) + "\\n")


@hookimpl
def kdbench_on_stage_end(stage, seconds, cached):
    _record(stage=stage, cached=cached)


@hookimpl
def kdbench_on_cell_end(cell, result):
    _record(cell=cell, status=result["status"])
"""
VOLATILE = ("wall_seconds", "train_seconds", "peak_memory_mb")  # how long and how much memory, not what


def kdbench_run(root: Path, name: str, cache: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdbench", "run", "-e", str(root / "shared.yaml"), "--out", str(root / f"out-{cache}"),
         "--plugins-dir", str(root / "plugins")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "KDBENCH_CACHE_DIR": str(root / f"cache-{cache}"), "KDBENCH_TEST_EVENTS": str(root / f"{name}.jsonl"),
             "OMP_NUM_THREADS": "1"})


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def leaderboard(out: Path) -> list[dict[str, Any]]:
    rows = json.loads((out / "leaderboard.json").read_text())
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.mark.slow
def test_two_runs_on_one_cache_build_every_node_once(tmp_path: Path, children: list[subprocess.Popen[str]],
                                                     subprocess_env: Callable[..., dict[str, str]]) -> None:
    (tmp_path / "shared.yaml").write_text(EXPERIMENT)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "observer.py").write_text(OBSERVER)
    env = subprocess_env()
    runs = [kdbench_run(tmp_path, name, "shared", env) for name in ("a", "b")]  # started together
    children.extend(runs)
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-4000:]
    a, b = events(tmp_path / "a.jsonl"), events(tmp_path / "b.jsonl")

    # Both walked the whole graph: the same stages, each built by one of them and reused by the other.
    stages = Counter(e["stage"] for e in a if "stage" in e)
    assert stages and stages == Counter(e["stage"] for e in b if "stage" in e)
    assert Counter(e["stage"] for e in a + b if "stage" in e and not e["cached"]) == stages
    cache = tmp_path / "cache-shared"
    assert len(list(cache.glob("*/*/inputs.json"))) == sum(stages.values())
    assert not list(cache.glob("*/.building-*"))
    # Each cell evaluated once, by one of them.
    cells = Counter(e["cell"] for e in a + b if "cell" in e)
    assert cells and set(cells.values()) == {1}
    assert len(list((tmp_path / "out-shared").glob("cells/**/result.json"))) == len(cells)
    assert not list((tmp_path / "out-shared").glob("cells/**/.*"))  # no temporary file or lock among the results
    # They overlapped: one waited for the other, and said for whom.
    err = outputs[0][1] + outputs[1][1]
    assert f"pid {runs[0].pid} on " in err or f"pid {runs[1].pid} on " in err

    # A report while a cell is being evaluated leaves that cell out; the folder's files are the normal mode.
    cell = next((tmp_path / "out-shared").glob("cells/**/result.json")).parent
    holder = start(HOLD_LOCK, str(store.cell_lock(cell)))
    children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    folder = load_folder(tmp_path / "out-shared")
    assert len(folder.results) == len(cells) - 1
    assert folder.in_progress == (cell.relative_to(tmp_path / "out-shared" / "cells").as_posix(),)
    printed = CliRunner().invoke(app, ["report", str(tmp_path / "out-shared"), "--format", "csv"])
    note = " ".join(printed.stderr.split())  # rich wraps lines at the terminal's width
    assert printed.exit_code == 0 and "1 cell in progress" in note and folder.in_progress[0] in note
    holder.kill()
    holder.wait(30)
    assert len(load_folder(tmp_path / "out-shared").results) == len(cells)  # its worker gone, the cell is read
    (tmp_path / "plain").write_text("")
    mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)  # what open() gives here
    assert stat.S_IMODE((cell / "result.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "out-shared" / "leaderboard.json").stat().st_mode) == mode

    # The same leaderboard as one run alone on an empty cache.
    single = kdbench_run(tmp_path, "single", "single", env)
    children.append(single)
    _, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-4000:]
    assert leaderboard(tmp_path / "out-shared") == leaderboard(tmp_path / "out-single")


@pytest.mark.slow
def test_a_worker_passes_over_what_another_is_making_and_waits_for_it_last(
        tmp_path: Path, children: list[subprocess.Popen[str]], subprocess_env: Callable[..., dict[str, str]]) -> None:
    """Another worker holds the first cell (as if scoring it): this run scores every other cell meanwhile, instead of
    queueing behind it, and takes the held cell up once its holder is gone."""
    from kdbench.config import load_experiment
    from kdbench.grid.collect import collect
    from kdbench.grid.execute import cell_folder
    from kdbench.grid.selection import resolve_selection
    from kdbench.registry import load_registries

    (tmp_path / "shared.yaml").write_text(EXPERIMENT)
    experiment, registries = load_experiment(tmp_path / "shared.yaml"), load_registries()
    graph = collect(experiment, registries, resolve_selection(experiment, registries, ["sft", "kd"], ["gpt2"], 2))
    out = tmp_path / "out"
    folders = [cell_folder(out, node) for node in graph.cells()]
    held, others = folders[0], folders[1:]
    assert len(others) >= 3  # the teacher and both methods over two training seeds
    holder = start(HOLD_LOCK, str(store.cell_lock(held)))
    children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

    run = subprocess.Popen(
        [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "shared.yaml"), "--methods", "sft,kd",
         "--seeds", "2", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1"))
    children.append(run)
    deadline = time.monotonic() + 600
    while not all((folder / "result.json").is_file() for folder in others):
        assert run.poll() is None and time.monotonic() < deadline, "the run queued behind the held cell"
        time.sleep(0.5)
    assert not (held / "result.json").exists() and run.poll() is None  # it waits for the held cell, last
    holder.kill()
    holder.wait(30)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-4000:]
    assert json.loads((held / "result.json").read_text())["status"] == "ok"
    assert f"pid {holder.pid} on " in " ".join(err.split())  # it said whom it waited for


@pytest.mark.slow
def test_an_export_passes_over_a_stage_another_worker_is_making(
        tmp_path: Path, children: list[subprocess.Popen[str]], subprocess_env: Callable[..., dict[str, str]]) -> None:
    """`kdbench export-teachers` shares a cache with a run as the run's workers share it: while another worker holds
    the GPT-2 teacher's stage, the export trains the OPT teacher instead of queueing, then waits for the held one."""
    from kdbench.config import load_experiment
    from kdbench.grid.collect import TEACHER_METHOD, collect
    from kdbench.grid.selection import resolve_selection
    from kdbench.registry import load_registries

    (tmp_path / "shared.yaml").write_text(EXPERIMENT)
    experiment, registries = load_experiment(tmp_path / "shared.yaml"), load_registries()
    graph = collect(experiment, registries, resolve_selection(experiment, registries, ["sft"], ["gpt2", "opt"], 1))
    teachers = {node.family: node.deps["model"] for node in graph.cells() if node.spec.method == TEACHER_METHOD}
    cache = StageCache(tmp_path / "cache")
    holder = start(HOLD_LOCK, str(cache.lock_path("train", teachers["gpt2"])))
    children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

    export = subprocess.Popen(
        [sys.executable, "-m", "kdbench", "export-teachers", "-e", str(tmp_path / "shared.yaml"), "--models",
         "gpt2,opt", "--out", str(tmp_path / "teachers")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1"))
    children.append(export)
    deadline = time.monotonic() + 600
    while not cache.has("train", teachers["opt"]):
        assert export.poll() is None and time.monotonic() < deadline, "the export queued behind the held teacher"
        time.sleep(0.5)
    assert not cache.entry("train", teachers["gpt2"]).exists() and export.poll() is None
    holder.kill()
    holder.wait(30)
    _, err = export.communicate(timeout=600)
    assert export.returncode == 0, err[-4000:]
    assert all((tmp_path / "teachers" / family / "config.json").is_file() for family in ("gpt2", "opt"))


# -- a cache shared read-only ----------------------------------------------------------------------------------

READ_ONLY_EXPERIMENT = """
name: read-only
protocol: uniform
data: {dataset: tiny, options: {n_train: 120, n_validation: 8, n_test: 8}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
init: {start: base}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 8, max_steps: 2}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 8, max_steps: 2}
selection: {every: 2, metric: loss}
methods: {sft: {}, kd: {}}
evaluation: {seeds: [10], max_new_tokens: 8, batch_size: 8}
"""
# Runs its arguments with the folder "$0" mounted read-only, in a mount namespace of their own (gone when they
# end): the kernel refuses every write there (EROFS), even root's, whom permission bits do not stop.
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` cannot be written: a read-only bind mount where this machine lets an
    unprivileged user namespace mount; else, for a user other than root, the folder's write bits taken away."""
    prefix = ["unshare", "--mount", "--map-root-user", "sh", "-c", READ_ONLY_MOUNT, str(folder)]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except FileNotFoundError:  # no unshare
        probe = None
    if probe is not None and probe.returncode == 0:
        return prefix
    if os.geteuid() == 0:
        pytest.skip("root writes to any folder whatever its mode, and this machine gives no mount namespace to "
                    "mount the cache read-only in")
    subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
    return []


@pytest.mark.slow
def test_a_read_only_cache_that_holds_every_stage_serves_a_run_and_one_that_lacks_a_stage_is_refused(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """A team's shared cache that nobody may write to: a run whose every stage is published there scores its cells
    from it (reading an entry takes no lock) with the leaderboard a writable cache gives; a run that would have to
    build a stage there stops before anything with the folder and the first stages to build named."""
    (tmp_path / "read-only.yaml").write_text(READ_ONLY_EXPERIMENT)
    cache = tmp_path / "cache"
    env = {**subprocess_env(KDBENCH_CACHE_DIR=str(cache)), "OMP_NUM_THREADS": "1"}

    def kdbench_run(out: str, *extra: str, prefix: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "read-only.yaml"), "--out",
                   str(tmp_path / out), *extra]
        return subprocess.run([*prefix, *command], env=env, capture_output=True, text=True, timeout=900)

    built = kdbench_run("built", "--methods", "sft")
    assert built.returncode == 0, built.stderr[-3000:]
    before = sorted(str(path.relative_to(cache)) for path in cache.rglob("*"))
    read_only = read_only_prefix(cache)
    try:
        reused = kdbench_run("reused", "--methods", "sft", prefix=read_only)
        assert reused.returncode == 0, reused.stderr[-3000:]
        assert leaderboard(tmp_path / "reused") == leaderboard(tmp_path / "built")
        refused = kdbench_run("refused", prefix=read_only)  # kd: its training stage is not in the cache
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = " ".join(refused.stderr.split())  # as one line, whatever the console's width
    assert f"the cache folder {cache}: {cache} is " in message
    assert "1 stage(s) this run needs are not built there (gpt2/s1/kd/seed0 (train))" in message
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused" / "cells").exists()
    assert sorted(str(path.relative_to(cache)) for path in cache.rglob("*")) == before  # nothing written to it
