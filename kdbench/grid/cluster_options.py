"""The options of ``kdbench run --executor slurm`` (or ``submitit-local``): how every job of a grid is asked of the
cluster, checked together before anything is loaded, each error saying which flag to change."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdbench.distributed import launched_world_size
from kdbench.errors import KdbenchError

EXECUTORS = ("local", "slurm", "submitit-local")
DEFAULT_TIMEOUT_MIN = 240
LOG_FOLDER = "slurm"  # under the results folder: submitit's pickles, sbatch scripts and one log per job task
# How often the submitting process looks at its jobs (--poll-seconds): local jobs are cheap to poll; on Slurm each look
# is one sacct call (for every job at once), which a shared cluster's accounting daemon answers for every user.
POLL_SECONDS = {"slurm": 30.0, "submitit-local": 1.0}
# How long the wait goes on while Slurm's accounting reports no state for a job (--unreported-seconds) before it ends
# with an error: without accounting a job that dies never counts as ended.
UNREPORTED_SECONDS = 600.0
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
    unreported_seconds: float = UNREPORTED_SECONDS  # how long a job may go without a state before the wait ends

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU, as ``accelerate launch`` starts them."""
        return self.gpus_per_node or 1


def cluster_options(executor: str, *, slurm_partition: str | None, gpus_per_node: int | None, timeout_min: int | None,
                    slurm_options: Sequence[str], slurm_array_parallelism: int | None,
                    no_wait: bool, poll_seconds: float | None = None,
                    unreported_seconds: float | None = None) -> ClusterOptions | None:
    """The ``run`` command's executor options, checked together before anything is loaded; None for ``local``."""
    if executor not in EXECUTORS:
        raise KdbenchError(f"--executor {executor!r} is not an executor; expected local, slurm or submitit-local.")
    slurm_only = {"--slurm-partition": slurm_partition is not None, "--slurm-option": bool(slurm_options),
                  "--slurm-array-parallelism": slurm_array_parallelism is not None}
    job_options = {"--gpus-per-node": gpus_per_node is not None, "--timeout-min": timeout_min is not None,
                   "--no-wait": no_wait, "--poll-seconds": poll_seconds is not None,
                   "--unreported-seconds": unreported_seconds is not None}
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
    if unreported_seconds is not None and not 0 < unreported_seconds < math.inf:
        raise KdbenchError(f"--unreported-seconds {unreported_seconds} is not a positive number of seconds; expected how "
                           f"long to wait for a job's state from Slurm's accounting, such as {UNREPORTED_SECONDS:g} (the "
                           "default).")
    for option, given in (("--poll-seconds", poll_seconds), ("--unreported-seconds", unreported_seconds)):
        if given is not None and no_wait:
            raise KdbenchError(f"{option} bounds the waiting command's looks at its jobs, and --no-wait returns at once. "
                               "Drop one of them.")
    return ClusterOptions(executor=executor, gpus_per_node=gpus_per_node, timeout_min=timeout_min or DEFAULT_TIMEOUT_MIN,
                          partition=slurm_partition, sbatch=_sbatch_options(slurm_options),
                          array_parallelism=slurm_array_parallelism, wait=not no_wait,
                          poll_seconds=poll_seconds or POLL_SECONDS[executor],
                          unreported_seconds=unreported_seconds or UNREPORTED_SECONDS)


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


