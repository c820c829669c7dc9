"""A watchdog on every stage, so a stage that stops making progress says so instead of sitting silent.

The loops that do a stage's work call ``progress(what)`` as they go (an optimizer step, a generated batch, a scored
batch). ``watch`` runs the stage with a daemon thread that looks at the last report: after ``stall_seconds`` without
one it prints what the stage last did, appends every thread's stack to the run's log (``faulthandler``), and then
either says so again every ``stall_seconds`` (``warn``) or ends the stage (``fail``): ``StageStalled`` is raised in
the main thread as soon as it runs Python again (a signal interrupts a sleep or a blocking read at once; a
collective operation in C++ first runs into its own timeout, ``runtime.collective_timeout_seconds``).
"""

from __future__ import annotations

import faulthandler
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

# The signal that carries a "fail" into the main thread; restored after every stage.
STALL_SIGNAL = signal.SIGUSR1


class StageStalled(Exception):
    """A stage made no progress for ``runtime.stall_seconds`` under ``runtime.on_stall: fail``."""


class Watchdog:
    def __init__(self, stage: str, stall_seconds: float, on_stall: str, log: Path, say: Callable[[str], None]) -> None:
        self.stage, self.stall_seconds, self.on_stall, self.log, self.say = stage, stall_seconds, on_stall, log, say
        self.last_progress, self.last_what = time.monotonic(), "started"
        self.finishing = False  # set once the stage is over: a late "fail" then has nothing to end
        self._done = threading.Event()

    def progress(self, what: str) -> None:
        self.last_progress, self.last_what = time.monotonic(), what

    def run(self) -> None:
        """The watching thread: a look every second (or sooner for a short bound) until the stage ends; the n-th
        report of one silence comes after n times ``stall_seconds``."""
        seen, reports = self.last_progress, 0
        while not self._done.wait(min(1.0, self.stall_seconds / 4)):
            if self.last_progress != seen:
                seen, reports = self.last_progress, 0
            if time.monotonic() - seen >= self.stall_seconds * (reports + 1):
                reports += 1
                self.stalled(time.monotonic() - seen)

    def stalled(self, quiet: float) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            log.write(f"\n{datetime.now().isoformat(timespec='seconds')} watchdog: {self.stage} made no progress for "
                      f"{seconds(quiet)} (last: {self.last_what}); every thread's stack:\n")
            log.flush()
            faulthandler.dump_traceback(file=log, all_threads=True)
        then = ("ending the stage as failed (runtime.on_stall: fail)" if self.on_stall == "fail" else
                f"still waiting; set runtime.on_stall: fail to end such a stage, or a longer runtime.stall_seconds "
                f"than {self.stall_seconds:g} if it is only slow")
        self.say(f"watchdog: {self.stage} has made no progress for {seconds(quiet)} (last: {self.last_what}); every "
                 f"thread's stack is in {self.log}; {then}.")
        if self.on_stall == "fail":
            self._done.set()
            signal.pthread_kill(threading.main_thread().ident or 0, STALL_SIGNAL)

    def stop(self) -> None:
        self._done.set()


_current: Watchdog | None = None


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def progress(what: str) -> None:
    """Report that the running stage just did ``what`` (no-op outside ``watch``)."""
    if _current is not None:
        _current.progress(what)


@contextmanager
def watch(stage: str, stall_seconds: float, on_stall: str, log: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Run the body as stage ``stage`` under a watchdog (see the module docstring). In a thread other than the main
    one a stage cannot be interrupted, so ``fail`` acts as ``warn`` there."""
    global _current
    in_main = threading.current_thread() is threading.main_thread()
    watchdog = Watchdog(stage, stall_seconds, on_stall if in_main else "warn", log, say)

    def interrupt(signum: int, frame: Any) -> None:
        if watchdog.finishing:
            return
        raise StageStalled(f"no progress for {watchdog.stall_seconds:g} s (runtime.stall_seconds; last: "
                           f"{watchdog.last_what}); every thread's stack is in {watchdog.log}")

    previous = signal.signal(STALL_SIGNAL, interrupt) if in_main else None
    outer, _current = _current, watchdog
    thread = threading.Thread(target=watchdog.run, name=f"kdbench watchdog: {stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        watchdog.finishing = True
        watchdog.stop()
        thread.join()
        _current = outer
        if in_main:
            signal.signal(STALL_SIGNAL, previous)
