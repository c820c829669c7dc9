"""``kdbench run --workers N``: the grid as N processes on this machine, one thread each, sharing the cache and the
results folder.

Each worker is the same ``kdbench run`` command without ``--workers``: the cache's lock per key builds every stage
once and a worker passes over what another is making (``kdbench.grid.cache``), so N workers finish a CPU grid
sooner than one process using N threads, whose small matmuls scale poorly. One thread each also makes a cell's
numbers independent of the machine's core count: a cell is always computed by one process with one thread, which is
how the committed references are made. The command that starts them waits, then prints the leaderboard.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from kdbench.runtime import say
from kdbench.runtime.signals import Stopped

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_arguments(arguments: Sequence[str]) -> list[str]:
    """``arguments`` (those of a ``kdbench run`` command) with ``--workers N`` / ``--workers=N`` taken out."""
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--workers":
            skip = True
        elif not argument.startswith("--workers="):
            kept.append(argument)
    return kept


def run_workers(arguments: Sequence[str], count: int) -> int:
    """Run ``count`` workers of the ``kdbench run`` command with ``arguments`` and wait for every one; the highest
    exit code. Their progress goes to this process's stderr; their leaderboards are not printed (the caller prints
    one). A stop signal is passed on to every worker, which stops as a run does (finished cells kept), and raised
    again here once they have ended."""
    command = [sys.executable, "-m", "kdbench", *worker_arguments(arguments)]
    environment = {**os.environ, **ONE_THREAD}
    say(f"running the grid as {count} workers of one thread each")
    workers = [subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL) for _ in range(count)]
    try:
        return max(worker.wait() for worker in workers)
    except Stopped as stop:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(stop.signal)
        for worker in workers:
            worker.wait()
        raise
