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
prints the leaderboard from the results folder, as an in-process run does. The jobs' options are checked in
``cluster_options``; the waiting process's looks at the jobs are ``cluster_watch``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdbench.errors import KdbenchError
from kdbench.grid.cluster_options import LOG_FOLDER, ClusterOptions
from kdbench.grid.cluster_watch import EndedJob, JobWatch, job_ids
from kdbench.runtime.signals import Stopped

if TYPE_CHECKING:
    import submitit

    from kdbench.grid.cache import StageCache
    from kdbench.grid.execute import RunSummary
    from kdbench.grid.graph import Node, StageGraph
    from kdbench.grid.session import GridRequest, PreparedGrid
    from kdbench.registry import Registries
    from kdbench.results.schema import CellResult


def _check_slurm_is_here() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise KdbenchError(f"--executor slurm needs Slurm's sbatch and srun on PATH; this machine has no "
                           f"{' or '.join(missing)}. Run it on a login node of the cluster, or use --executor "
                           "submitit-local to run the same jobs on this machine.")


# -- the jobs ------------------------------------------------------------------------------------------------------

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
        from kdbench.grid.session import prepare, run_prepared
        from kdbench.process import command_environment, environment, quiet_libraries

        with environment(command_environment()), environment(_process_group_environment(), override=True):
            quiet_libraries()
            prepared = prepare(self.request)
            missing = [key for key in self.targets if key not in prepared.graph.nodes]
            if missing:
                raise KdbenchError(
                    f"job {self.name!r}: {len(missing)} of its stages are not in the grid this job collected (keys "
                    f"{', '.join(missing[:3])}): kdbench or a plugin changed after the jobs were submitted. Run the same "
                    "`kdbench run --executor ...` again to submit jobs for the grid as it is now.")
            summary = run_prepared(prepared, self.targets)
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


def run_on_cluster(prepared: PreparedGrid, options: ClusterOptions) -> ClusterRun | None:
    """Submit the unfinished part of the prepared graph as the shared job and the cell array, wait for them, and
    return what they left in the results folder; None when ``options.wait`` is off (the jobs run on, their ids
    printed). Each job prepares the same graph again from the request (``GridJob``)."""
    import submitit

    from kdbench.grid.cache import StageCache
    from kdbench.grid.execute import check_vocabularies, finished_cells
    from kdbench.grid.security import remote_code_scope

    graph, request, registries = prepared.graph, prepared.request.absolute(), prepared.registries
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
            watch_command = (f"squeue -j {','.join(job_ids([shared_job, *cell_jobs]))}" if options.executor == "slurm"
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
    except (KeyboardInterrupt, Stopped):  # the waiting stops; the jobs are the scheduler's
        running = [job.job_id for job in (shared_job, *cell_jobs) if job is not None]
        if running:
            unsent = "" if cell_jobs else " (the cells were not submitted yet)"
            _say(f"stopped waiting; job(s) {', '.join(running[:5])}{' …' if len(running) > 5 else ''} run on{unsent}. "
                 f"`kdbench report {request.out_dir}` reads what they finish"
                 + ("; `scancel` stops them." if options.executor == "slurm" else "."))
        raise
    return ClusterRun(recorded_results(graph, request.out_dir), lost)


# -- waiting -------------------------------------------------------------------------------------------------------
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

def _labels(graph: StageGraph, keys: Sequence[str]) -> str:
    shown = [f"{graph[key].label} {graph[key].kind.value}" for key in keys[:4]]
    return ", ".join(shown) + (f", … {len(keys) - 4} more" if len(keys) > 4 else "")

def _id_range(jobs: Sequence[submitit.Job[object]]) -> str:
    ids = [job.job_id for job in jobs]
    return ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"


def _say(line: str) -> None:
    # stderr: stdout carries the leaderboard, as in an in-process run
    print(f"kdbench: {line}", file=sys.stderr, flush=True)
