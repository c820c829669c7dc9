"""The grid as cluster jobs through submitit: ``kdbench run --executor slurm`` (or ``submitit-local``).

A run becomes two kinds of job over one cache and one results folder, both on a filesystem every node sees:

- the **shared job** builds every stage that two or more unfinished cells need (the tokenizer, the teachers, the
  stored teacher generations, the SFT inits), so no two cell jobs ever build the same stage;
- the **cell jobs**, one per unfinished cell, are one job array that starts once the shared job has succeeded
  (Slurm ``afterok``). submitit's local executor has no dependencies, so there the submitting process waits for the
  shared job before it submits the array.

Every job is the in-process executor (``run_graph``) narrowed to its own nodes: it reuses what the cache and the
results folder already hold, builds the rest, and isolates a failing stage as an in-process run does. A job that
is requeued (time limit, preemption) or submitted again therefore resumes where the last one stopped. A job with
several GPUs runs one task per GPU, and the tasks join one data-parallel process group, the one
``accelerate launch`` would start. The submitting process waits for the jobs (unless ``--no-wait``) and then
prints the leaderboard from the results folder, as an in-process run does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kdbench.distributed import launched_world_size
from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    import submitit

    from kdbench.config import Experiment
    from kdbench.grid.cache import StageCache
    from kdbench.grid.execute import RunSummary
    from kdbench.grid.graph import Node, StageGraph
    from kdbench.grid.selection import Selection
    from kdbench.registry import Registries
    from kdbench.results.schema import CellResult

EXECUTORS = ("local", "slurm", "submitit-local")
DEFAULT_TIMEOUT_MIN = 240
LOG_FOLDER = "slurm"  # under the results folder: submitit's pickles, sbatch scripts and one log per job task
# How often the submitting process looks at its jobs (--poll-seconds): local jobs are cheap to poll; on Slurm each look
# is one sacct call (for every job at once), which a shared cluster's accounting daemon answers for every user.
POLL_SECONDS = {"slurm": 30.0, "submitit-local": 1.0}
# Looks in a row in which Slurm's accounting reports no state for a job (sacct fails, or does not list the job) before
# the wait ends with an error: 10 minutes at the default 30 s. Without accounting a job that dies never counts as ended.
UNREPORTED_LOOKS = 20
# sacct states after which a job never runs again (a requeued job goes through REQUEUED and PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "REVOKED", "PREEMPTED"}
# sbatch options that kdbench or submitit set themselves: given through --slurm-option they would unwire the jobs.
OWN_SBATCH_OPTIONS = {
    "partition": "use --slurm-partition",
    "time": "use --timeout-min",
    "gpus-per-node": "use --gpus-per-node",
    "ntasks-per-node": "kdbench runs one task per GPU: use --gpus-per-node",
    "nodes": "each job runs on one node",
    "dependency": "kdbench makes the cell array depend on the shared job",
    "array": "kdbench submits the cells as the array (--slurm-array-parallelism caps how many run at once)",
    "output": f"job logs go to <out>/{LOG_FOLDER}/",
    "error": f"job logs go to <out>/{LOG_FOLDER}/",
    "job-name": "kdbench names the jobs after the experiment",
    "signal": "submitit asks for USR2 before the time limit, to checkpoint and requeue",
    "open-mode": "submitit appends to the logs of a requeued job",
}
SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class ClusterOptions:
    """How ``kdbench run`` spreads the grid over jobs; every job (the shared one and each cell's) gets the same."""

    executor: str  # slurm or submitit-local
    gpus_per_node: int | None  # None: no GPUs asked of Slurm; a local job sees this machine's GPUs
    timeout_min: int
    partition: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # --slurm-option KEY=VALUE
    array_parallelism: int | None = None
    wait: bool = True
    poll_seconds: float = POLL_SECONDS["slurm"]  # how often the waiting process looks at the jobs

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU, as ``accelerate launch`` starts them."""
        return self.gpus_per_node or 1


def cluster_options(executor: str, *, slurm_partition: str | None, gpus_per_node: int | None, timeout_min: int | None,
                    slurm_options: Sequence[str], slurm_array_parallelism: int | None,
                    no_wait: bool, poll_seconds: float | None = None) -> ClusterOptions | None:
    """The ``run`` command's executor options, checked together before anything is loaded; None for ``local``."""
    if executor not in EXECUTORS:
        raise KdbenchError(f"--executor {executor!r} is not an executor; expected local, slurm or submitit-local.")
    slurm_only = {"--slurm-partition": slurm_partition is not None, "--slurm-option": bool(slurm_options),
                  "--slurm-array-parallelism": slurm_array_parallelism is not None}
    job_options = {"--gpus-per-node": gpus_per_node is not None, "--timeout-min": timeout_min is not None,
                   "--no-wait": no_wait, "--poll-seconds": poll_seconds is not None}
    if executor == "local":
        given = [name for name, present in {**slurm_only, **job_options}.items() if present]
        if given:
            raise KdbenchError(f"{', '.join(given)} {'describes' if len(given) == 1 else 'describe'} cluster jobs, and "
                               "--executor is local (this process). "
                               "Add --executor slurm (or submitit-local, the same jobs on this machine), or drop them.")
        return None
    if executor == "submitit-local":
        given = [name for name, present in slurm_only.items() if present]
        if given:
            raise KdbenchError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --executor slurm; "
                               "submitit-local runs the jobs on this "
                               "machine. Use --executor slurm, or drop them.")
    if launched_world_size() > 1:
        raise KdbenchError(f"--executor {executor} submits jobs from one process, and this one is one of "
                           f"{launched_world_size()} started by a launcher. Run `kdbench run --executor {executor}` "
                           "directly, not under accelerate launch, torchrun or deepspeed: each job starts its own "
                           "processes (--gpus-per-node).")
    if slurm_partition is not None:
        _check_sbatch_value("--slurm-partition", slurm_partition)
    if poll_seconds is not None and not 0 < poll_seconds < math.inf:
        raise KdbenchError(f"--poll-seconds {poll_seconds} is not a positive number of seconds; expected how often to "
                           f"look at the jobs, such as {POLL_SECONDS['slurm']:g} (the default on Slurm).")
    if poll_seconds is not None and no_wait:
        raise KdbenchError("--poll-seconds says how often the waiting command looks at its jobs, and --no-wait returns "
                           "at once. Drop one of them.")
    return ClusterOptions(executor=executor, gpus_per_node=gpus_per_node, timeout_min=timeout_min or DEFAULT_TIMEOUT_MIN,
                          partition=slurm_partition, sbatch=_sbatch_options(slurm_options),
                          array_parallelism=slurm_array_parallelism, wait=not no_wait,
                          poll_seconds=poll_seconds or POLL_SECONDS[executor])


def _check_slurm_is_here() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise KdbenchError(f"--executor slurm needs Slurm's sbatch and srun on PATH; this machine has no "
                           f"{' or '.join(missing)}. Run it on a login node of the cluster, or use --executor "
                           "submitit-local to run the same jobs on this machine.")


def _check_sbatch_value(option: str, value: str) -> None:
    # submitit quotes every value it writes into the sbatch script, but a line break would end its #SBATCH line.
    if not value or any(not character.isprintable() for character in value):
        raise KdbenchError(f"{option} {value!r} is empty or holds a line break or control character; expected one "
                           "line of text, such as gpu or account=myproject.")


def _sbatch_options(given: Sequence[str]) -> dict[str, str]:
    """``--slurm-option KEY=VALUE`` (repeated) as sbatch options: ``account=proj`` becomes ``#SBATCH --account=proj``."""
    options: dict[str, str] = {}
    for item in given:
        key, equals, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not equals or not SBATCH_KEY.fullmatch(key):
            raise KdbenchError(f"--slurm-option {item!r} is not KEY=VALUE; expected an sbatch option without its "
                               "dashes, such as account=myproject, qos=high or mem=64G.")
        key = key.replace("_", "-")
        if key in OWN_SBATCH_OPTIONS:
            raise KdbenchError(f"--slurm-option {item!r}: kdbench sets --{key} itself ({OWN_SBATCH_OPTIONS[key]}).")
        _check_sbatch_value("--slurm-option", value)
        options[key] = value
    return options


# -- the jobs ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridRequest:
    """What every job needs to collect the very graph the submitting process collected (absolute paths: a job may
    start in another folder, on another node)."""

    experiment: Experiment
    selection: Selection
    plugins_dir: Path | None
    out_dir: Path
    cache_dir: Path


class GridJob:
    """One job: the in-process executor narrowed to ``targets`` (stage or cell keys) and what they need.

    ``checkpoint`` is what submitit calls on a time limit or a preemption before it requeues the job. There is
    nothing to save here: built stages are in the cache, scored cells in the results folder, and a training stage
    keeps its own checkpoints. So the requeued job is this same job, which skips whatever is finished."""

    def __init__(self, request: GridRequest, targets: Sequence[str], name: str) -> None:
        self.request = request
        self.targets = tuple(targets)
        self.name = name  # what a person reads in the logs: "shared stages" or a cell's label

    def __call__(self) -> dict[str, CellResult]:
        from kdbench import distributed
        from kdbench.grid.collect import collect
        from kdbench.grid.execute import run_graph
        from kdbench.grid.security import remote_code_scope
        from kdbench.process import command_environment, environment, quiet_libraries
        from kdbench.registry import load_registries

        request = self.request
        with environment(command_environment()), environment(_process_group_environment(), override=True):
            quiet_libraries()
            registries = load_registries(request.plugins_dir)
            graph = collect(request.experiment, registries, request.selection)
            missing = [key for key in self.targets if key not in graph.nodes]
            if missing:
                raise KdbenchError(
                    f"job {self.name!r}: {len(missing)} of its stages are not in the grid this job collected (keys "
                    f"{', '.join(missing[:3])}): kdbench or a plugin changed after the jobs were submitted. Run the same "
                    "`kdbench run --executor ...` again to submit jobs for the grid as it is now.")
            distributed.init_process_group()
            with remote_code_scope(request.experiment, graph, request.cache_dir):  # as `kdbench run` trusts
                summary = run_graph(graph, request.experiment, registries, request.out_dir, request.cache_dir,
                                    targets=set(self.targets))
            main = distributed.is_main()
            distributed.destroy_process_group()
        return summary.results if main else {}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"GridJob({self.name!r}, {len(self.targets)} targets)"


def _process_group_environment() -> dict[str, str]:
    """For a job of several tasks, the variables ``torch.distributed`` reads (``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), as ``accelerate launch`` sets them, from submitit's view of the job;
    kdbench then joins that group as it joins a launcher's. Every task keeps every GPU of its node in view and picks
    its own by ``LOCAL_RANK``, as under ``accelerate launch``."""
    import submitit

    if submitit.JobEnvironment().num_tasks == 1:
        return {}
    group = submitit.helpers.TorchDistributedEnvironment()
    return {"MASTER_ADDR": group.master_addr, "MASTER_PORT": str(group.master_port), "RANK": str(group.rank),
            "WORLD_SIZE": str(group.world_size), "LOCAL_RANK": str(group.local_rank),
            "LOCAL_WORLD_SIZE": str(group.local_world_size)}


# -- planning and submitting ---------------------------------------------------------------------------------------

def shared_stages(graph: StageGraph, cells: Sequence[Node], cache: StageCache | None = None) -> list[str]:
    """Keys of the stages that two or more of ``cells`` are built from, in run order, leaving out those ``cache``
    holds already: the shared job's share, and no shared job when it is empty. (A checkpoint has nothing to build; a
    cell is never in another cell's lineage.)"""
    from kdbench.grid.graph import StageKind

    readers = Counter(key for cell in cells for key in graph.lineage(cell.key))
    return [key for key in graph.nodes if readers[key] >= 2
            and graph[key].kind not in (StageKind.CHECKPOINT, StageKind.EVAL)
            and not (cache is not None and cache.has(graph[key].kind.value, key))]


@dataclass
class ClusterRun:
    """What the jobs left: every cell's result in the results folder (a cell whose job ended without writing one is
    recorded as failed), and one line per cell job that ended without a result or was cancelled."""

    summary: RunSummary
    lost: list[str]  # one line per cell: its job, what happened, where its log is


def make_executor(options: ClusterOptions, folder: Path, name: str) -> submitit.AutoExecutor:
    import submitit
    import torch

    cluster = "slurm" if options.executor == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters: dict[str, object] = {"name": name, "timeout_min": options.timeout_min, "nodes": 1,
                                     "tasks_per_node": options.tasks_per_node}
    if options.gpus_per_node is not None:
        parameters["gpus_per_node"] = options.gpus_per_node
    elif cluster == "local":  # the local executor hides every GPU it was not asked for (CUDA_VISIBLE_DEVICES)
        parameters["gpus_per_node"] = torch.cuda.device_count()
    if cluster == "slurm":
        parameters["slurm_partition"] = options.partition
        parameters["slurm_additional_parameters"] = dict(options.sbatch)
        if options.array_parallelism is not None:
            parameters["slurm_array_parallelism"] = options.array_parallelism
    executor.update_parameters(**parameters)
    return executor


@contextmanager
def _submission_environment() -> Iterator[None]:
    """submitit's ``clean_env`` (a job submitted from inside a job must not inherit that job's allocation or process
    group), keeping what the user set to say which cluster and which defaults: ``SLURM_CONF`` and ``SBATCH_*``
    (Slurm sets neither inside a job). Without ``SLURM_CONF``, sbatch on a cluster configured through it fails."""
    import submitit

    from kdbench.process import environment

    kept = {name: value for name, value in os.environ.items() if name == "SLURM_CONF" or name.startswith("SBATCH_")}
    with submitit.helpers.clean_env(), environment(kept):
        yield


def run_on_cluster(graph: StageGraph, request: GridRequest, options: ClusterOptions,
                   registries: Registries) -> ClusterRun | None:
    """Submit the unfinished part of ``graph`` as the shared job and the cell array, wait for them, and return what
    they left in the results folder; None when ``options.wait`` is off (the jobs run on, their ids printed)."""
    import submitit

    from kdbench.grid.cache import StageCache
    from kdbench.grid.execute import check_vocabularies, finished_cells
    from kdbench.grid.security import remote_code_scope

    if options.executor == "slurm":
        _check_slurm_is_here()
    cells = [node for node in graph.cells() if node.key not in finished_cells(graph, request.out_dir)]
    if not cells:
        _say("every cell is finished; nothing to submit.")
        return ClusterRun(recorded_results(graph, request.out_dir), [])
    with remote_code_scope(request.experiment, graph, request.cache_dir):  # before anything queues
        check_vocabularies(graph, {key for cell in cells for key in graph.lineage(cell.key)})
    folder = request.out_dir / LOG_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdbenchError(f"cannot create the job folder {folder} ({error.strerror or error}); expected a results "
                           "folder (--out) you can write to, on a filesystem every node sees.") from None
    shared = shared_stages(graph, cells, StageCache(request.cache_dir))
    name = f"kdbench-{request.experiment.name}"
    executor = make_executor(options, folder, f"{name}-shared")
    watch = JobWatch(options, folder)
    shared_job: submitit.Job[dict[str, CellResult]] | None = None
    cell_jobs: list[submitit.Job[dict[str, CellResult]]] = []
    try:
        if shared:
            with _submission_environment():
                shared_job = executor.submit(GridJob(request, shared, "shared stages"))
            _say(f"submitted the shared stages ({len(shared)}: {_labels(graph, shared)}) as job {shared_job.job_id}")
            if options.executor == "slurm":
                # kill-on-invalid-dep: if the shared job fails, Slurm cancels the array instead of leaving it pending.
                executor.update_parameters(slurm_dependency=f"afterok:{shared_job.job_id}", slurm_additional_parameters={
                    **options.sbatch, "kill-on-invalid-dep": "yes"})
            else:  # the local executor has no dependencies: the cells wait here
                ended = next(watch.ended([shared_job]))
                if ended.error is not None:
                    return _shared_job_failed(graph, request, ended, len(cells))
        executor.update_parameters(name=f"{name}-cells")
        with _submission_environment():
            cell_jobs = executor.submit_array([GridJob(request, [cell.key], cell.label) for cell in cells])
        after = f" once job {shared_job.job_id} succeeds" if shared_job is not None and options.executor == "slurm" else ""
        _say(f"submitted {len(cell_jobs)} cell(s) as job(s) {_id_range(cell_jobs)}{after}; logs in {folder}/")
        if not options.wait:
            watch_command = (f"squeue -j {','.join(_job_ids([shared_job, *cell_jobs]))}" if options.executor == "slurm"
                             else f"ls {folder}")
            _say(f"not waiting: watch with `{watch_command}`; `kdbench report {request.out_dir}` reads the results as "
                 "they come.")
            return None
        first = shared_job if options.executor == "slurm" else None  # the local one has ended already
        lost = _wait_for_cells(watch, first, cell_jobs, cells, _LostCells(graph, request, registries))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
        raise KdbenchError(f"the cluster refused the jobs: {str(error).strip()[-1500:]}\nCheck --slurm-partition, "
                           f"--gpus-per-node, --timeout-min and --slurm-option against the cluster's limits "
                           f"(sinfo, sacctmgr show qos).") from None
    except _SharedJobFailed as failed:
        for job in cell_jobs:  # Slurm cancels them too (kill-on-invalid-dep), where its version honours that
            job.cancel(check=False)
        return _shared_job_failed(graph, request, failed.ended, len(cells))
    except KeyboardInterrupt:
        running = [job.job_id for job in (shared_job, *cell_jobs) if job is not None]
        if running:
            unsent = "" if cell_jobs else " (the cells were not submitted yet)"
            _say(f"stopped waiting; job(s) {', '.join(running[:5])}{' …' if len(running) > 5 else ''} run on{unsent}. "
                 f"`kdbench report {request.out_dir}` reads what they finish"
                 + ("; `scancel` stops them." if options.executor == "slurm" else "."))
        raise
    return ClusterRun(recorded_results(graph, request.out_dir), lost)


# -- waiting -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndedJob:
    """A job that will not run again, as the waiting process saw it."""

    job: submitit.Job[dict[str, CellResult]]
    error: str | None  # None: every task wrote its result; else one line, why there is none
    cancelled: bool = False  # Slurm reports CANCELLED: stopped by a person (scancel), not by a failure


class JobWatch:
    """The waiting process's looks at its jobs, one every ``--poll-seconds``.

    On Slurm a look is one ``sacct`` call for all the jobs. (submitit's own watcher calls sacct on a schedule of its
    own, up to ten minutes apart, and takes a failing sacct for "no news", so a job that dies while accounting is
    down never counts as ended.) A job has ended when every task's result file is there, or when Slurm reports a
    final state on two looks in a row and squeue no longer shows it stopping: the second look gives a shared
    filesystem time to show a result written just before the job ended. A job for which accounting reports no state
    for ``UNREPORTED_LOOKS`` looks ends the wait with an error instead of a wait without end."""

    def __init__(self, options: ClusterOptions, folder: Path) -> None:
        self.options = options
        self.folder = folder  # where submitit writes every job's result file
        self.final_once: set[str] = set()  # jobs seen in a final state on the last look, without a result
        self.reported_at: dict[str, float] = {}  # job id → when accounting last reported its state
        self.states: dict[str, dict[str, str]] = {}  # the last look's sacct fields, by job id
        self.sacct_error: str | None = None
        self.seen_ended: set[str] = set()

    def has_ended(self, job: submitit.Job[dict[str, CellResult]]) -> bool:
        """Whether ``job`` has ended, as far as the looks so far tell."""
        return job.job_id in self.seen_ended or self._final(job)

    def ended(self, jobs: Sequence[submitit.Job[dict[str, CellResult]]]) -> Iterator[EndedJob]:
        """Each of ``jobs`` once it has ended, in the order they end; looks until every one has."""
        waiting = list(jobs)
        while waiting:
            stopping: set[str] = set()
            if self.options.executor == "slurm":
                self.states = self._slurm_states(waiting)
                stopping = self._completing([job for job in waiting if self._final(job) and not _result_written(job)])
            for job in list(waiting):
                ended = self._look(job, stopping)
                if ended is not None:
                    waiting.remove(job)
                    self.seen_ended.add(job.job_id)
                    yield ended
            if waiting:
                time.sleep(self.options.poll_seconds)

    def _final(self, job: submitit.Job[dict[str, CellResult]]) -> bool:
        return self.states.get(job.job_id, {}).get("State", "").split(" ")[0] in FINAL_STATES

    def _look(self, job: submitit.Job[dict[str, CellResult]], stopping: set[str]) -> EndedJob | None:
        if self.options.executor != "slurm":  # a local job is a process of this machine: submitit sees it end
            if not job.done():
                return None
            error = job.exception()
            return EndedJob(job, None if error is None else _reason(error))
        if _result_written(job):
            error = job.exception()  # read from the result files: no sacct call
            return EndedJob(job, None if error is None else _reason(error))
        now = time.monotonic()
        state = self.states.get(job.job_id)
        if state is None:
            since = self.reported_at.setdefault(job.job_id, now)
            if now - since >= UNREPORTED_LOOKS * self.options.poll_seconds:
                self._unreported(job, now - since)
            return None
        self.reported_at[job.job_id] = now
        if not self._final(job) or job.job_id in stopping:
            self.final_once.discard(job.job_id)
            return None
        if job.job_id not in self.final_once:
            self.final_once.add(job.job_id)
            return None
        return EndedJob(job, f"Slurm reports {state['State']} (exit code {state.get('ExitCode', '?')})",
                        cancelled=state["State"].startswith("CANCELLED"))

    @staticmethod
    def _completing(jobs: Sequence[submitit.Job[dict[str, CellResult]]]) -> set[str]:
        """Of ``jobs`` (in a final state), those whose processes are still being stopped. sacct reports CANCELLED
        the moment a job is cancelled, while its processes (submitit has them ignore SIGTERM) run on until Slurm's
        KillWait ends in SIGKILL; only squeue tells. Empty when squeue fails: the wait must end."""
        if not jobs:
            return set()
        command = ["squeue", "--noheader", "--states=COMPLETING", "--format=%i", f"--jobs={','.join(_job_ids(jobs))}"]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return set(completed.stdout.split()) if completed.returncode == 0 else set()

    def _slurm_states(self, jobs: Sequence[submitit.Job[dict[str, CellResult]]]) -> dict[str, dict[str, str]]:
        """Each job's sacct fields by job id (an array's elements each under ``<array id>_<index>``); empty when sacct
        fails, its error kept for the message."""
        from submitit.slurm.slurm import SlurmInfoWatcher

        try:  # an NFS client may cache the folder's listing: touching it makes a new result file visible
            self.folder.chmod(self.folder.stat().st_mode)
        except OSError:
            pass
        command = ["sacct", "--parsable2", "--format=JobID,State,ExitCode", f"--jobs={','.join(_job_ids(jobs))}"]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            self.sacct_error = str(error)
            return {}
        if completed.returncode != 0:
            lines = completed.stderr.strip().splitlines()
            self.sacct_error = lines[-1] if lines else f"sacct exited with code {completed.returncode}"
            return {}
        self.sacct_error = None
        return SlurmInfoWatcher().read_info(completed.stdout)  # submitit's reader: it expands pending array ranges

    def _unreported(self, job: submitit.Job[dict[str, CellResult]], seconds: float) -> None:
        ids = job.job_id.split("_")[0]
        why = f"sacct fails: {self.sacct_error}" if self.sacct_error else "sacct does not list the job"
        raise KdbenchError(
            f"Slurm's accounting has reported no state for job {job.job_id} for {seconds:.0f} s ({why}), so kdbench "
            f"cannot tell whether it runs or ended without a result. Check that accounting answers: `sacct -j {ids}` "
            f"(slurmdbd must run). The jobs are left as they are: `squeue -j {ids}` lists them while they run, "
            f"`kdbench report {self.folder.parent}` reads what they finished, and once they have ended the same "
            "`kdbench run` command submits whatever is unfinished. (The wait gives up after "
            f"{UNREPORTED_LOOKS} looks without a state, every --poll-seconds {self.options.poll_seconds:g}.)")


class _SharedJobFailed(Exception):
    def __init__(self, ended: EndedJob) -> None:
        super().__init__(ended.error)
        self.ended = ended


class _LostCells:
    """Records a cell whose job ended without a result as ``failed``, as an in-process run records a failed stage: its
    report row says so, and the next ``kdbench run`` runs it again."""

    def __init__(self, graph: StageGraph, request: GridRequest, registries: Registries) -> None:
        self.graph, self.request, self.registries = graph, request, registries

    def record(self, cell: Node, reason: str) -> None:
        from kdbench.grid.execute import cell_folder, claim_cell
        from kdbench.grid.stages import RunContext, write_unscored_cell

        request = self.request
        with claim_cell(cell_folder(request.out_dir, cell), cell) as unscored:  # never over a score that did arrive
            if unscored:
                context = RunContext(self.graph, request.experiment, self.registries, request.out_dir, request.cache_dir)
                write_unscored_cell(context, cell, "failed", {"reason": reason, "stage": f"{cell.label}: cluster job",
                                                              "stage_key": cell.key, "step": None})


def _wait_for_cells(watch: JobWatch, shared_job: submitit.Job[dict[str, CellResult]] | None,
                    jobs: Sequence[submitit.Job[dict[str, CellResult]]], cells: Sequence[Node],
                    lost_cells: _LostCells) -> list[str]:
    """Report each cell as its job ends (and the shared job, which the cells wait for, if it fails); the lines of
    the cell jobs that ended without a result."""
    by_job = {job.job_id: cell for job, cell in zip(jobs, cells)}
    lost: list[str] = []
    cancelled = 0
    done = 0
    for ended in watch.ended([*([shared_job] if shared_job is not None else []), *jobs]):
        if ended.job is shared_job:
            if ended.error is not None:
                raise _SharedJobFailed(ended)
            continue
        done += 1
        cell, job = by_job[ended.job.job_id], ended.job
        if ended.error is None:
            statuses = Counter(result["status"] for result in job.results()[0].values())  # rank 0's
            _say(f"[{done}/{len(jobs)}] {cell.label} (job {job.job_id}): {', '.join(sorted(statuses)) or 'already finished'}")
        elif ended.cancelled:
            cancelled += 1
            lost.append(f"{cell.label} (job {job.job_id}) was cancelled before it wrote a result: {ended.error}")
            _say(f"[{done}/{len(jobs)}] {lost[-1]}")
        else:
            lost.append(_lost_line(ended, cell.label, "its cell is recorded as failed; "))
            _say(f"[{done}/{len(jobs)}] {lost[-1]}")
            lost_cells.record(cell, f"job {job.job_id} ended without a result: {ended.error}; log: {job.paths.stderr}")
        if done == len(jobs):
            break  # every cell job has ended; the shared job still runs only if the cells were cancelled
    if cancelled:
        running = f" The shared job {shared_job.job_id} runs on (`scancel {shared_job.job_id}` stops it)." if (
            shared_job is not None and not watch.has_ended(shared_job)) else ""
        _say(f"{cancelled} cell job(s) were cancelled (scancel): their cells have no result, and what they built is "
             f"either whole in the cache or not there.{running} Run the same command again to submit the "
             "unfinished cells.")
    return lost


def recorded_results(graph: StageGraph, out_dir: Path) -> RunSummary:
    """Every cell of ``graph`` whose result file holds its key, scored or not (what an in-process run returns)."""
    from kdbench.grid.execute import RunSummary, cell_folder

    summary = RunSummary()
    for node in graph.cells():
        path = cell_folder(out_dir, node) / "result.json"
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and result.get("key") == node.key:
            summary.results[node.label] = result
    return summary


def _shared_job_failed(graph: StageGraph, request: GridRequest, ended: EndedJob, cells: int) -> ClusterRun:
    lost = [_lost_line(ended, "the shared stages", f"none of the {cells} unfinished cell(s) ran: ")]
    _say(lost[0])
    return ClusterRun(recorded_results(graph, request.out_dir), lost)


def _lost_line(ended: EndedJob, what: str, consequence: str = "") -> str:
    return (f"{what} (job {ended.job.job_id}) ended without a result: {ended.error} — log: {ended.job.paths.stderr}; "
            f"{consequence}run the same command again to retry.")


def _reason(error: Exception) -> str:
    """One line out of submitit's error: the last line of the job's traceback (between its dashed rules), or else
    the opening of the message (a job that never wrote a result: cancelled, killed, out of memory)."""
    parts = str(error).split("-" * 22)
    text = parts[1] if len(parts) >= 3 else parts[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if len(parts) >= 3 else " ".join(lines[:2]))[:400] if lines else "no error recorded"


def _labels(graph: StageGraph, keys: Sequence[str]) -> str:
    shown = [f"{graph[key].label} {graph[key].kind.value}" for key in keys[:4]]
    return ", ".join(shown) + (f", … {len(keys) - 4} more" if len(keys) > 4 else "")


def _result_written(job: submitit.Job[dict[str, CellResult]]) -> bool:
    return all(job.task(task).paths.result_pickle.exists() for task in range(job.num_tasks))


def _job_ids(jobs: Sequence[submitit.Job[object] | None]) -> list[str]:
    """The Slurm ids of ``jobs``: one per array, however many elements."""
    return sorted({job.job_id.split("_")[0] for job in jobs if job is not None}, key=int)


def _id_range(jobs: Sequence[submitit.Job[object]]) -> str:
    ids = [job.job_id for job in jobs]
    return ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"


def _say(line: str) -> None:
    # stderr: stdout carries the leaderboard, as in an in-process run
    print(f"kdbench: {line}", file=sys.stderr, flush=True)
