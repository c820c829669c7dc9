"""SIGINT (Ctrl-C) and SIGTERM (``scancel``, ``kill``, most schedulers' first word) stop a run the same way.

Inside ``stopping_on_signals`` either signal raises ``Stopped`` in the main thread, so the stack unwinds through
every ``finally`` on its way out: a stage's staging folder is removed (``kdbench.grid.cache``), its locks are
released, and its resume checkpoints stay where they are for the next run. ``kdbench.cli.main`` then says how to go
on and exits with 128 + the signal's number (130, 143), as a shell reports a process that a signal ended.

Every ``kdbench`` command runs inside it (``kdbench.cli.main``); what there is to keep comes from ``run`` and the
export commands. Under ``--executor slurm`` the command that waits for the jobs stops waiting and the jobs run on.
A cluster job never runs inside it: submitit, which runs the job, has its own handlers (SIGUSR2 checkpoints and
requeues, SIGTERM is ignored until Slurm's SIGKILL), and a job's stages run through
``kdbench.grid.cluster.GridJob``, which does not go through ``kdbench.cli.main``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop signal arrived. Not an ``Exception``, so a stage's failure isolation (``except Exception``) lets it
    through rather than recording a failed cell; not a ``KeyboardInterrupt``, which typer turns into exit 130
    before kdbench can say how to resume, and which would lose which signal it was."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)

    def describe(self) -> str:
        return "Ctrl-C (SIGINT)" if self.signal is signal.SIGINT else self.signal.name


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise ``Stopped`` in the main thread; the previous handlers come back on the way
    out. Only the first signal raises: a second one (an impatient Ctrl-C, a scheduler's repeated SIGTERM) arriving
    while the first unwinds would cut a ``finally`` short and leave its staging folder behind, so it is ignored.
    SIGKILL still ends the process at once. A signal this process was started ignoring stays ignored; outside the
    main thread nothing is installed (Python allows handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise Stopped(signum)

    # A signal ignored from the start stays ignored: ``nohup``, or a shell's background job, wants no SIGINT.
    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
