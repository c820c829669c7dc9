"""How the submitting process knows its cluster jobs have ended: ``JobWatch`` looks at them every
``--poll-seconds`` (on Slurm through ``sacct`` and ``squeue``) and hands each over once it will not run again."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    import submitit

    from kdbench.grid.cluster_options import ClusterOptions
    from kdbench.results.schema import CellResult

# sacct states after which a job never runs again (a requeued job goes through REQUEUED and PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "REVOKED", "PREEMPTED"}


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
    (sacct fails, or does not list it) for ``--unreported-seconds`` ends the wait with an error instead of a wait
    without end."""

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
            if now - since >= self.options.unreported_seconds:
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
        command = ["squeue", "--noheader", "--states=COMPLETING", "--format=%i", f"--jobs={','.join(job_ids(jobs))}"]
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
        command = ["sacct", "--parsable2", "--format=JobID,State,ExitCode", f"--jobs={','.join(job_ids(jobs))}"]
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
            "`kdbench run` command submits whatever is unfinished. (The wait gives up after --unreported-seconds "
            f"{self.options.unreported_seconds:g} without a state.)")

def _reason(error: Exception) -> str:
    """One line out of submitit's error: the last line of the job's traceback (between its dashed rules), or else
    the opening of the message (a job that never wrote a result: cancelled, killed, out of memory)."""
    parts = str(error).split("-" * 22)
    text = parts[1] if len(parts) >= 3 else parts[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if len(parts) >= 3 else " ".join(lines[:2]))[:400] if lines else "no error recorded"

def _result_written(job: submitit.Job[dict[str, CellResult]]) -> bool:
    return all(job.task(task).paths.result_pickle.exists() for task in range(job.num_tasks))


def job_ids(jobs: Sequence[submitit.Job[object] | None]) -> list[str]:
    """The Slurm ids of ``jobs``: one per array, however many elements."""
    return sorted({job.job_id.split("_")[0] for job in jobs if job is not None}, key=int)
