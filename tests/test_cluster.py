"""Cluster execution through submitit: ``kdbench run --executor submitit-local`` and ``--executor slurm``.

The submitit-local run is the real cluster path on this machine: the shared stages as one job, then each cell as a
job of its own, every job a separate process that builds into its own cache. It is preempted once (SIGUSR2, what
Slurm sends before a time limit), requeued by submitit and resumed, and its leaderboard must still equal an
in-process run's with a cache of its own: the jobs compute the same numbers, not merely read them back.

The Slurm path runs through a real cluster in ``tests/test_slurm_real.py``. What that one-node CPU cluster cannot
show on demand is checked here up to sbatch: the scripts for GPUs, tasks per GPU, partitions, accounts and QOS it
does not have. A stand-in ``sbatch`` numbers the jobs, and the scripts and pickled jobs submitit wrote must say
what runs where and after what.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.grid.cluster import GridJob
from kdbench.grid.cluster_options import cluster_options

pytestmark = pytest.mark.slow  # grids through submitit-local jobs

EXPERIMENT = """
name: cluster
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2], students: [s1]}
teacher: {training: {engine: deepspeed, zero_stage: 1, lr: 3.0e-3, batch_size: 16, max_steps: 10}}
init: {training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 16, max_steps: 4}}
training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 16, max_steps: 4}
methods: {sft: {}, kd: {}}
evaluation: {seeds: [10], max_new_tokens: 16, batch_size: 24}
"""
KDBENCH = [sys.executable, "-m", "kdbench"]
# What differs between two runs of the same numbers: the clock and the process's memory.
TIMINGS = {"wall_seconds", "train_seconds", "peak_memory_mb"}
USR2_BIT = 1 << (signal.SIGUSR2 - 1)


def _report_rows(out: Path, env: dict[str, str]) -> list[dict]:
    completed = subprocess.run([*KDBENCH, "report", str(out), "--format", "json"], capture_output=True, text=True,
                               env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in json.loads(completed.stdout)]


def _catches_usr2(pid: int) -> bool:
    """Whether submitit's handler is installed in process ``pid`` (before it is, SIGUSR2 would simply kill it)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & USR2_BIT)


def _preempt_shared_job(slurm: Path, cache: Path, run: subprocess.Popen[str]) -> int:
    """Send SIGUSR2 to the shared job's task once it is inside the run (its first stage is in the cache); its id."""
    import psutil

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and run.poll() is None:
        pickles = sorted(slurm.glob("*_submitted.pkl"))
        built = list(cache.glob("*/*/inputs.json"))
        if pickles and built:
            job_id = int(pickles[0].name.split("_")[0])  # a local job's id is its controller's pid
            tasks = psutil.Process(job_id).children()
            if tasks and _catches_usr2(tasks[0].pid):
                os.kill(tasks[0].pid, signal.SIGUSR2)
                return job_id
        time.sleep(0.05)
    raise AssertionError(f"the shared job never started building (kdbench exited with {run.poll()})")


@pytest.mark.slow
def test_submitit_local_run_survives_a_preemption_and_equals_the_in_process_run(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    (tmp_path / "cluster.yaml").write_text(EXPERIMENT)
    args = ("run", "-e", str(tmp_path / "cluster.yaml"))
    base = subprocess_env(OMP_NUM_THREADS="1")  # the jobs inherit it from the submitting process
    local_env = {**base, "KDBENCH_CACHE_DIR": str(tmp_path / "cache-local")}
    cluster_env = {**base, "KDBENCH_CACHE_DIR": str(tmp_path / "cache-cluster")}

    local = subprocess.run([*KDBENCH, *args, "--out", str(tmp_path / "local")], capture_output=True, text=True,
                           env=local_env, timeout=600, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]

    run = subprocess.Popen([*KDBENCH, *args, "--out", str(tmp_path / "cluster"), "--executor", "submitit-local",
                            "--timeout-min", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=cluster_env, cwd=tmp_path)
    shared_job = _preempt_shared_job(tmp_path / "cluster/slurm", tmp_path / "cache-cluster", run)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert "kdbench leaderboard: cluster" in stdout

    # submitit caught the signal, requeued the shared job (it checkpoints to itself) and ran it again to the end.
    slurm = tmp_path / "cluster/slurm"
    shared_log = (slurm / f"{shared_job}_0_log.out").read_text()
    assert "this job is preempted" in shared_log and "Requeued job" in shared_log
    assert shared_log.count("Starting with") == 2 and shared_log.count("Job completed successfully") == 1
    # one job for the shared stages, then one per cell (teacher, sft, kd), each a process of its own
    jobs = {int(path.name.split("_")[0]) for path in slurm.glob("*_submitted.pkl")}
    assert len(jobs) == 4 and shared_job in jobs
    assert stderr.count(": ok") == 3

    # Both runs built the same stages, each into its own cache ...
    def entries(cache: Path) -> set[str]:
        return {f"{path.parent.parent.name}/{path.parent.name}" for path in cache.glob("*/*/inputs.json")}

    assert entries(tmp_path / "cache-cluster") == entries(tmp_path / "cache-local") != set()
    # ... trained the same way, step by step (kd's curve is not sft's, so the comparison tells cells apart) ...
    curves = {}
    for out in ("local", "cluster"):
        for method in ("sft", "kd"):
            log = tmp_path / out / f"cells/gpt2/s1/{method}/seed0/train_log.jsonl"
            curves[out, method] = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert curves["cluster", "sft"] == curves["local", "sft"] and curves["cluster", "kd"] == curves["local", "kd"]
    assert curves["local", "sft"] != curves["local", "kd"] and len(curves["local", "kd"]) == 4
    # ... and score the same leaderboard, row for row.
    rows_local, rows_cluster = _report_rows(tmp_path / "local", base), _report_rows(tmp_path / "cluster", base)
    assert sorted(row["method"] for row in rows_local) == ["kd", "sft", "teacher"]
    assert all(row["status"] == "ok" and row["rougeL_mean"] is not None for row in rows_local)
    assert rows_cluster == rows_local

    # The same command again finds every cell finished: nothing is submitted, the leaderboard is printed.
    again = subprocess.run([*KDBENCH, *args, "--out", str(tmp_path / "cluster"), "--executor", "submitit-local"],
                           capture_output=True, text=True, env=cluster_env, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to submit" in again.stderr and "kdbench leaderboard: cluster" in again.stdout
    assert len(list(slurm.glob("*_submitted.pkl"))) == 4


FAKE_SBATCH = """#!/bin/sh
# Slurm's sbatch, as far as submitit can tell: it numbers the jobs and says so.
counter="$(dirname "$0")/last-job-id"
id=$(( $(cat "$counter" 2>/dev/null || echo 100) + 1 ))
echo "$id" > "$counter"
echo "Submitted batch job $id"
"""


def test_slurm_scripts_ask_for_gpus_partition_and_account_a_stand_in_sbatch_for_what_the_real_cluster_lacks(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The real one-node cluster has no GPUs, one partition and no accounts: the sbatch scripts for a GPU cluster
    are read here, with a stand-in sbatch that only numbers the jobs."""
    from submitit.core.utils import DelayedSubmission

    from kdbench.config import load_experiment
    from kdbench.grid.collect import collect
    from kdbench.grid.selection import resolve_selection
    from kdbench.registry import load_registries

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "cluster.yaml").write_text(EXPERIMENT)
    env = subprocess_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KDBENCH_CACHE_DIR=str(tmp_path / "cache"))
    completed = subprocess.run(
        [*KDBENCH, "run", "-e", str(tmp_path / "cluster.yaml"), "--out", str(tmp_path / "out"), "--executor", "slurm",
         "--slurm-partition", "gpu", "--gpus-per-node", "2", "--timeout-min", "90", "--slurm-option", "account=proj",
         "--slurm-option", "qos=high", "--slurm-array-parallelism", "2", "--no-wait"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "squeue -j 101,102" in completed.stderr
    assert not list((tmp_path / "cache").glob("*/*/inputs.json"))  # submitting builds nothing

    slurm = tmp_path / "out/slurm"
    shared_script, cells_script = (slurm / "101_submission.sh").read_text(), (slurm / "102_submission.sh").read_text()
    for script in (shared_script, cells_script):  # every job: the resources asked for, logs in the results folder
        for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1", "--time=90",
                     "--account=proj", "--qos=high", "--signal=USR2@90", f"--output={slurm}/"):
            assert f"#SBATCH {line}" in script, (line, script)
    assert "--dependency" not in shared_script and "--array" not in shared_script
    for line in ("--array=0-2%2", "--dependency=afterok:101", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {line}" in cells_script

    graph = collect(load_experiment(tmp_path / "cluster.yaml"), load_registries(), resolve_selection(
        load_experiment(tmp_path / "cluster.yaml"), load_registries(), None, None, None))
    readers = Counter(key for cell in graph.cells() for key in graph.lineage(cell.key))
    shared: GridJob = DelayedSubmission.load(slurm / "101_submitted.pkl").function
    labels = {(graph[key].label, graph[key].kind.value) for key in shared.targets}
    # the lineage two or more cells share; never a cell's own training or evaluation
    assert set(shared.targets) == {key for key, n in readers.items() if n >= 2 and graph[key].kind.value != "eval"}
    assert {("data", "tokenizer"), ("gpt2/teacher", "train"), ("gpt2/s1/init/seed0", "train")} <= labels
    assert not labels & {("gpt2/s1/sft/seed0", "train"), ("gpt2/s1/kd/seed0", "train")}
    cells = [DelayedSubmission.load(slurm / f"102_{task}_submitted.pkl").function for task in range(3)]
    assert sorted(key for job in cells for key in job.targets) == sorted(cell.key for cell in graph.cells())
    # A preempted or timed-out job requeues itself: finished work is in the cache and the results folder.
    assert cells[0].checkpoint().function is cells[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"executor": "slurmm"}, "expected local, slurm or submitit-local"),
    ({"executor": "local", "slurm_partition": "gpu"}, "--slurm-partition describes cluster jobs"),
    ({"executor": "local", "gpus_per_node": 2, "no_wait": True}, "--gpus-per-node, --no-wait describe cluster jobs"),
    ({"executor": "submitit-local", "slurm_options": ["account=x"]}, "--slurm-option applies to --executor slurm"),
    ({"executor": "slurm", "slurm_options": ["account"]}, "is not KEY=VALUE"),
    ({"executor": "slurm", "slurm_options": ["time=60"]}, "use --timeout-min"),
    ({"executor": "slurm", "slurm_options": ["dependency=afterok:1"]}, "depend on the shared job"),
    ({"executor": "slurm", "slurm_options": ["comment=a\n#SBATCH --x"]}, "line break"),
    ({"executor": "slurm", "slurm_options": ["a b=c"]}, "is not KEY=VALUE"),
    ({"executor": "local", "poll_seconds": 5.0}, "--poll-seconds describes cluster jobs"),
    ({"executor": "slurm", "poll_seconds": 0.0}, "--poll-seconds 0.0 is not a positive number of seconds"),
    ({"executor": "slurm", "poll_seconds": float("nan")}, "--poll-seconds nan is not a positive number"),
    ({"executor": "slurm", "poll_seconds": 5.0, "no_wait": True}, "--no-wait returns at once"),
    ({"executor": "local", "unreported_seconds": 60.0}, "--unreported-seconds describes cluster jobs"),
    ({"executor": "slurm", "unreported_seconds": -1.0}, "--unreported-seconds -1.0 is not a positive number of seconds"),
    ({"executor": "slurm", "unreported_seconds": 60.0, "no_wait": True}, "--no-wait returns at once"),
])
def test_bad_executor_options_say_what_to_do(options: dict, message: str) -> None:
    given = {"slurm_partition": None, "gpus_per_node": None, "timeout_min": None, "slurm_options": [],
             "slurm_array_parallelism": None, "no_wait": False, "poll_seconds": None, "unreported_seconds": None,
             **options}
    with pytest.raises(KdbenchError, match=re.escape(message)):
        cluster_options(given.pop("executor"), **given)


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "submitit-local", "--slurm-partition", "gpu"], "--slurm-partition applies to --executor slurm"),
    (["--executor", "slurm", "--poll-seconds=-5"], "--poll-seconds -5.0 is not a positive number of seconds"),
])
def test_a_bad_combination_exits_2_without_a_traceback(args: list[str], message: str,
                                                       subprocess_env: Callable[..., dict[str, str]]) -> None:
    completed = subprocess.run([*KDBENCH, "run", *args], capture_output=True, text=True, env=subprocess_env(),
                               timeout=600)
    assert completed.returncode == 2
    assert message in " ".join(completed.stderr.split())
    assert "Traceback" not in completed.stderr


# Loads in the submitting process (which checks every plugin before it submits) and fails inside the jobs only.
FAILS_IN_JOBS = """
import os

if os.environ.get("SUBMITIT_EXECUTOR"):
    raise RuntimeError("no GPU driver on this node")
"""


def test_a_crashed_shared_job_is_reported_and_no_cell_runs(tmp_path: Path,
                                                            subprocess_env: Callable[..., dict[str, str]]) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fails_in_jobs.py").write_text(FAILS_IN_JOBS)
    (tmp_path / "cluster.yaml").write_text(EXPERIMENT)
    completed = subprocess.run(
        [*KDBENCH, "run", "-e", str(tmp_path / "cluster.yaml"), "--out", str(tmp_path / "out"), "--executor",
         "submitit-local", "--plugins-dir", str(tmp_path / "plugins")],
        capture_output=True, text=True, env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1"),
        timeout=600, cwd=tmp_path)
    assert completed.returncode == 1, completed.stderr[-3000:]
    stderr = " ".join(completed.stderr.split())
    assert "the shared stages (job" in stderr and "no GPU driver on this node" in stderr, stderr[-3000:]
    assert "none of the 3 unfinished cell(s) ran" in stderr and "_log.err" in stderr
    assert "Traceback" not in completed.stderr and "leaderboard" not in completed.stdout
    assert len(list((tmp_path / "out/slurm").glob("*_submitted.pkl"))) == 1  # the cells were never submitted
    assert not (tmp_path / "out/cells").exists()
