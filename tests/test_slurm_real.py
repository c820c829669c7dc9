"""``kdbench run --executor slurm`` on a real Slurm cluster: real sbatch, sacct, squeue, scontrol and scancel.

The tests run where ``sinfo`` shows an idle node, and skip elsewhere, saying why. CI brings up the one-node cluster of
``.ci/slurm.sh up`` (Debian's Slurm 22.05 with accounting) and sets ``KDBENCH_SLURM_TESTS=required``, which turns a
missing cluster into a failure instead of a skip. Every job runs on this machine, so the tests do to the jobs what a
cluster does: ``scancel --signal=USR2`` (Slurm's warning before a time limit or a preemption, on which submitit
requeues the job with ``scontrol requeue``), SIGKILL to a job's task (the out-of-memory killer: a job that dies
without a result) and ``scancel`` of the whole array (the user). One test changes the client's view of accounting:
a copy of slurm.conf whose accounting port nobody listens on, so sacct fails as it does when slurmdbd is down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

KDBENCH = [sys.executable, "-m", "kdbench"]
# Two families, two methods (and each family's teacher row): six cells. The teachers train 150 steps with a resume
# checkpoint every 10, long enough (some seconds) for a requeue to land inside the stage.
EXPERIMENT = """
name: slurm-real
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2, opt], students: [s1]}
teacher: {training: {engine: deepspeed, zero_stage: 1, lr: 3.0e-3, batch_size: 16, max_steps: 150}}
init: {training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 16, max_steps: 4}}
training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 16, max_steps: 4}
methods: {sft: {}, kd: {}}
evaluation: {seeds: [10], max_new_tokens: 16, batch_size: 24}
checkpoint_every: 10
"""
# What differs between two runs of the same numbers: the clock and the process's memory.
TIMINGS = {"wall_seconds", "train_seconds", "peak_memory_mb"}
POLL = "1"  # --poll-seconds: the tests want to see jobs end at once; the default (30 s) suits a shared cluster


def _cluster_state() -> str | None:
    """None when an idle node is here to run jobs on; else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm's commands (sinfo, sbatch) are not on PATH"
    try:
        completed = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    states = completed.stdout.split()
    if completed.returncode != 0 or "idle" not in states:
        return f"sinfo shows no idle node ({(completed.stderr.strip() or ' '.join(states) or 'no nodes')[:300]})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    why = _cluster_state()
    if why is None:
        return
    message = (f"no Slurm cluster to test on: {why}. Bring up the one-node cluster with `.ci/slurm.sh up` and export "
               "the SLURM_CONF it prints (docs/cluster.md).")
    if os.environ.get("KDBENCH_SLURM_TESTS") == "required":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage cache for the module's cluster runs: a later test reuses the stages an earlier one built."""
    return tmp_path_factory.mktemp("slurm-cache")


@pytest.fixture
def jobs_to_cancel() -> Iterator[set[str]]:
    """Job ids a test submitted: cancelled at its end, so a failing test leaves no job in the queue."""
    ids: set[str] = set()
    yield ids
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


class Run:
    """A ``kdbench run`` in the background; its stderr read line by line as it comes, each line with its time."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, jobs: set[str]) -> None:
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        self.lines: list[tuple[float, str]] = []
        self.stdout = ""
        self.jobs = jobs
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line))
            self.jobs.update(re.findall(r"\bjob\(?s?\)? (\d+)", line))

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = self.process.stdout.read()

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 300) -> tuple[float, re.Match[str]]:
        """The first stderr line that matches ``pattern`` (a regular expression) and when it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return at, found
            if self.process.poll() is not None and not any(reader.is_alive() for reader in self._readers):
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} (exit {self.process.poll()}):\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=30)
        return code


def _wait_until(condition: Callable[[], object], what: str, run: Run, timeout: float = 300) -> None:
    """Until ``condition()`` holds, while ``run`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.process.poll() is None, f"kdbench ended before {what}:\n{run.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.1)


def _task_started(log_folder: Path, job: str) -> bool:
    """Whether the job's Python task is running: submitit's first log line is there."""
    log = log_folder / f"{job}_0_log.out"
    return log.is_file() and "Starting with" in log.read_text(errors="replace")


def _task_pid(job: str) -> int:
    """The process id of the job's task (step 0, task 0: the Python process submitit starts), as Slurm lists it."""
    # scontrol listpids takes an array element by its own job id, not as <array>_<index>
    raw = subprocess.run(["squeue", "--noheader", "--format=%A", f"--jobs={job}"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    listed = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True, check=True, timeout=60)
    return next(int(fields[0]) for fields in map(str.split, listed.stdout.splitlines()[1:])
                if fields[2:4] == ["0", "0"])


def _rows(out: Path, env: dict[str, str]) -> list[dict]:
    completed = subprocess.run([*KDBENCH, "report", str(out), "--format", "json"], capture_output=True, text=True,
                               env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in json.loads(completed.stdout)]


def _sacct(*job_ids: str) -> str:
    """Slurm's account of the jobs, every record (a requeued job has one per run): what the test's log shows."""
    completed = subprocess.run(["sacct", "--duplicates", "--format=JobID%14,JobName%24,State%16,ExitCode,Elapsed,Start,End",
                                f"--jobs={','.join(job_ids)}"], capture_output=True, text=True, timeout=60)
    return completed.stdout + completed.stderr


def _training_key(experiment: Path, label: str) -> str:
    """The stage key of the training stage ``label`` (such as gpt2/teacher) in the experiment's graph."""
    from kdbench.config import load_experiment
    from kdbench.grid.collect import collect
    from kdbench.grid.selection import resolve_selection
    from kdbench.registry import load_registries

    config, registries = load_experiment(experiment), load_registries()
    graph = collect(config, registries, resolve_selection(config, registries, None, None, None))
    return next(node.key for node in graph if node.label == label and node.kind.value == "train")


def test_a_grid_through_sbatch_survives_a_requeue_and_a_killed_job_and_equals_the_in_process_run(
        slurm: None, cache: Path, tmp_path: Path, jobs_to_cancel: set[str],
        subprocess_env: Callable[..., dict[str, str]]) -> None:
    """(a) the grid through real sbatch scores what the in-process run scores, on every metric; (b) the shared job,
    signalled for preemption and requeued inside its first teacher's training, resumes from that stage's checkpoint;
    (c) a cell job killed without a result ends the run with exit 1 within a minute, that cell recorded as failed and
    every other cell finished; (d) the same command again submits only that cell."""
    (tmp_path / "grid.yaml").write_text(EXPERIMENT)
    # before anything runs: the graph takes this process some seconds to collect, and the training will not wait
    resume = cache / ".resume/train" / _training_key(tmp_path / "grid.yaml", "gpt2/teacher")
    base = subprocess_env(OMP_NUM_THREADS="1")  # the jobs inherit the submitting process's environment
    cluster_env = {**base, "KDBENCH_CACHE_DIR": str(cache)}
    command = [*KDBENCH, "run", "-e", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "cluster"), "--executor",
               "slurm", "--timeout-min", "20", "--poll-seconds", POLL]
    # The in-process run, with a cache of its own, alongside: it fills the CPU the jobs leave idle while they queue.
    local = subprocess.Popen([*KDBENCH, "run", "-e", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "local")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**base, "KDBENCH_CACHE_DIR": str(tmp_path / "cache-local")}, cwd=tmp_path)
    started = time.monotonic()
    run = Run(command, cluster_env, tmp_path, jobs_to_cancel)
    shared = run.wait_for_line(r"submitted the shared stages .* as job (\d+)")[1][1]
    array = run.wait_for_line(r"submitted 6 cell\(s\) as job\(s\) (\d+)_0 … \1_5 once job \d+ succeeds")[1][1]
    logs = tmp_path / "cluster/slurm"

    # (b) Inside the GPT-2 teacher's training, once it has written a resume checkpoint: the signal Slurm sends before
    # a time limit or a preemption (USR2). submitit's handler calls the job's checkpoint(), runs `scontrol requeue` on
    # it and exits at once; Slurm starts it again after cred_expire. (A bare `scontrol requeue` from outside would do
    # the same, but submitit ignores its SIGTERM, so the stage runs on for KillWait seconds and may finish first.)
    _wait_until(lambda: any(resume.glob("step-*")), "the GPT-2 teacher's first resume checkpoint", run)
    subprocess.run(["scancel", "--signal=USR2", shared], check=True, capture_output=True, timeout=60)
    requeued = time.monotonic()

    # (c) The last cell's job, once its task runs, loses that task to SIGKILL, as to the out-of-memory killer: it
    # writes no result. (`scancel --signal=KILL` would not do: Slurm takes that for a cancellation.)
    _wait_until(lambda: _task_started(logs, f"{array}_5"), f"job {array}_5 to start", run, timeout=600)
    os.kill(_task_pid(f"{array}_5"), signal.SIGKILL)
    killed = time.monotonic()
    noticed, _ = run.wait_for_line(rf"opt/s1/kd/seed0 \(job {array}_5\) ended without a result: Slurm reports FAILED")
    assert run.finish() == 1, run.stderr[-3000:]
    finished = time.monotonic()
    assert local.wait(timeout=600) == 0, local.stderr.read()[-3000:] if local.stderr else ""
    print(f"\ngrid with a requeue and a kill: {finished - started:.0f} s; requeue at {requeued - started:.0f} s; "
          f"the kill noticed after {noticed - killed:.1f} s\n{_sacct(shared, array)}")

    assert noticed - killed < 60
    stderr = " ".join(run.stderr.split())
    assert "its cell is recorded as failed" in stderr and "Traceback" not in stderr
    assert stderr.count(": ok") == 5, stderr[-3000:]  # every other cell finished
    assert "kdbench leaderboard: slurm-real" in run.stdout  # the leaderboard of what finished, the failed row in it
    killed_cell = json.loads((tmp_path / "cluster/cells/opt/s1/kd/seed0/result.json").read_text())
    assert killed_cell["status"] == "failed" and "ended without a result" in killed_cell["failure"]["reason"]
    rows = {row["family"] + "/" + row["method"]: row for row in _rows(tmp_path / "cluster", base)}
    assert rows["opt/kd"]["status"] == "failed" and rows["opt/sft"]["status"] == "ok"

    # (b) The shared job ran twice, and its second run continued the teacher's training from the checkpoint.
    shared_log = (logs / f"{shared}_0_log.out").read_text()
    assert "this job is preempted" in shared_log and "Requeued job" in shared_log
    assert shared_log.count("Starting with") == 2 and shared_log.count("Job completed successfully") == 1
    assert re.search(rf"^\s*{shared}\s+\S+\s+REQUEUED", _sacct(shared), re.MULTILINE)
    stats = json.loads((cache / "train" / resume.name / "train_stats.json").read_text())
    assert stats["resumed_at"] and 0 < stats["resumed_at"][0] < 150, stats["resumed_at"]

    # (d) The same command again: one job, for the failed cell alone (every shared stage is in the cache).
    again = Run(command, cluster_env, tmp_path, jobs_to_cancel)
    assert again.finish() == 0, again.stderr[-3000:]
    assert "submitted the shared stages" not in again.stderr
    assert re.search(r"submitted 1 cell\(s\) as job\(s\) \d+;", again.stderr), again.stderr[-3000:]  # an array of one
    assert re.search(r"\[1/1\] opt/s1/kd/seed0 \(job \d+\): ok", again.stderr)

    # (a) Every row, on every metric, is the in-process run's.
    rows_local = _rows(tmp_path / "local", base)
    assert sorted(row["method"] for row in rows_local) == ["kd", "kd", "sft", "sft", "teacher", "teacher"]
    assert all(row["status"] == "ok" for row in rows_local)
    assert _rows(tmp_path / "cluster", base) == rows_local


def test_scancel_of_the_array_ends_the_run_with_a_message_and_nothing_half_written(
        slurm: None, cache: Path, tmp_path: Path, jobs_to_cancel: set[str],
        subprocess_env: Callable[..., dict[str, str]]) -> None:
    """(e) The user cancels the cell array while the sft cell trains: `kdbench run` says so and exits 1; the
    cancelled cells have no result, no cache entry is half there, and no job runs on."""
    # Longer student training than the first test's (new stage keys), on the teachers and inits it cached.
    longer = re.sub(r"^(training: .*max_steps: )4\}$", r"\g<1>400}", EXPERIMENT, flags=re.MULTILINE)
    assert longer != EXPERIMENT
    (tmp_path / "grid.yaml").write_text(longer)
    sft_training = _training_key(tmp_path / "grid.yaml", "gpt2/s1/sft/seed0")
    env = subprocess_env(OMP_NUM_THREADS="1", KDBENCH_CACHE_DIR=str(cache))
    run = Run([*KDBENCH, "run", "-e", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out"), "--methods", "sft",
               "--models", "gpt2", "--executor", "slurm", "--poll-seconds", POLL], env, tmp_path, jobs_to_cancel)
    array = run.wait_for_line(r"submitted 2 cell\(s\) as job\(s\) (\d+)_0 … \1_1")[1][1]
    _wait_until(lambda: any((cache / ".resume/train" / sft_training).glob("step-*")),
                "the sft cell's training to write a checkpoint", run, timeout=600)
    subprocess.run(["scancel", array], check=True, capture_output=True, timeout=60)
    cancelled = time.monotonic()
    assert run.finish() == 1, run.stderr[-3000:]
    print(f"\nscancel of the array: the run ended {time.monotonic() - cancelled:.1f} s later\n{_sacct(array)}")

    stderr = " ".join(run.stderr.split())
    assert re.search(rf"gpt2/s1/sft/seed0 \(job {array}_1\) was cancelled before it wrote a result: Slurm reports "
                     "CANCELLED", stderr), stderr[-3000:]
    # The teacher's cell (an evaluation, some seconds) may have finished before the scancel.
    teacher_done = f"gpt2/teacher/teacher/seed0 (job {array}_0): ok" in stderr
    assert f"{1 if teacher_done else 2} cell job(s) were cancelled (scancel): their cells have no result" in stderr
    assert "Run the same command again to submit the unfinished cells." in stderr and "Traceback" not in stderr
    # Nothing half-written: the cancelled cells have no result (a finished one is whole), the leaderboard only
    # what finished, the interrupted training no cache entry; every entry is whole (a staging folder is no entry) ...
    results = sorted(path.parent.parent.name for path in (tmp_path / "out").glob("cells/*/*/*/*/result.json"))
    assert results == (["teacher"] if teacher_done else [])
    assert ("kdbench leaderboard" in run.stdout) == teacher_done
    assert not (cache / "train" / sft_training).exists()
    for entry in cache.glob("[!.]*/[!.]*"):  # <kind>/<key>; the dot folders are locks, checkpoints, staging
        assert (entry / "inputs.json").is_file(), entry
    # ... and the run ended once Slurm had stopped the jobs' processes, not when it marked them cancelled.
    queued = subprocess.run(["squeue", "--noheader", f"--jobs={array}"], capture_output=True, text=True, timeout=60)
    assert queued.stdout.strip() == ""


def test_a_job_state_accounting_cannot_report_ends_the_wait_with_an_error(
        slurm: None, tmp_path: Path, jobs_to_cancel: set[str], subprocess_env: Callable[..., dict[str, str]]) -> None:
    """Accounting down: sacct fails, so no job's state can be read. The wait ends after its bound with a message
    that says so, exit 2, no traceback; the jobs are left as they are (here held, so none could end meanwhile)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    conf = re.sub(r"^AccountingStoragePort=.*$", "", conf, flags=re.MULTILINE) + "AccountingStoragePort=9\n"
    (tmp_path / "slurm.conf").write_text(conf)  # port 9 (discard): nobody answers there
    (tmp_path / "grid.yaml").write_text(EXPERIMENT)
    env = subprocess_env(OMP_NUM_THREADS="1", KDBENCH_CACHE_DIR=str(tmp_path / "cache"),
                         SLURM_CONF=str(tmp_path / "slurm.conf"))
    run = Run([*KDBENCH, "run", "-e", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out"), "--executor", "slurm",
               "--poll-seconds", "0.5", "--unreported-seconds", "12", "--slurm-option", "begin=now+3600"], env, tmp_path,
              jobs_to_cancel)
    submitted, _ = run.wait_for_line(r"submitted 6 cell\(s\)")
    assert run.finish(timeout=300) == 2
    seconds = time.monotonic() - submitted

    stderr = " ".join(run.stderr.split())
    assert re.search(r"error: Slurm's accounting has reported no state for job \d+ for 1\d s \(sacct fails: ", stderr)
    assert "`squeue -j" in stderr and "Traceback" not in stderr
    assert 12 <= seconds < 60, seconds  # --unreported-seconds 12, looks 0.5 s apart (plus the sacct calls)
    assert "--unreported-seconds 12 without a state" in stderr
