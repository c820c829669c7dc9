"""Stage outputs keyed by everything they depend on, so a second run reuses them.

An entry is a folder ``<root>/<kind>/<key>/``; ``key`` is the stage's key in the stage graph (its
settings, code version and parents' keys, ``kdbench.grid.graph``), and ``inputs.json`` inside records
the node.

Many workers may share one cache: two ``kdbench run``s, cluster jobs, on one machine or on several
machines sharing a filesystem. What they get:

- **Atomic publication.** An entry is built in a staging folder ``<root>/<kind>/.building-<key>-<host>-<pid>``
  and renamed into place in one step, ``inputs.json`` and ``manifest.json`` written last before it: a reader
  sees a whole entry or none, and a killed worker leaves at most its staging folder (removed by the next worker
  that builds that key). A published entry is never replaced unless it is found corrupt (below): if two workers
  publish one key anyway, the first entry stays and the second is discarded.
- **One builder per key.** A worker holds the lock ``<root>/.locks/<kind>/<key>.lock`` (``flock``) from its
  check for the entry until the entry is published. Another worker that needs the key waits, saying whom it
  waits for (the lock file names the holder's host and pid), then reuses the entry; if the holder stopped
  without publishing (its stage failed, or it was killed), the waiter builds the entry itself. The kernel
  drops a dead process's lock with its open files, so a killed worker's lock is taken over at once: no
  timeout to guess, no heartbeat to miss, no lock file to delete.
- **Reading needs no write access.** A published entry is used without taking its lock (``claim`` asks ``done()``
  first), so a cache shared read-only serves every run that builds nothing in it; ``kdbench.preflight`` refuses
  a run that would have to build there before any stage starts.

Which filesystem gives what (atomic publication holds on all of them; the lock only saves repeated work):

- A local filesystem (ext4, xfs, btrfs, tmpfs, ...): everything above, between any processes of the machine.
- NFS (v3 with lockd, v4): everything above, between machines; Linux clients (since 2.6.12) send ``flock``
  to the server as a whole-file lock. A holder whose *machine* dies (not only its process) frees its lock
  when the server notices: NFSv4 when its lease ends (90 s by default), NFSv3 when that machine reboots.
  Attribute caching may rarely hide an entry that another machine has just published from a worker that
  then takes the lock: it builds the entry again and discards its copy at publication. Mounted with
  ``nolock`` or ``local_lock=flock|all``, locks are per machine: workers on different machines may build
  one key each, with the same outcome.
- Lustre: as NFS when mounted with ``-o flock``; per machine with ``localflock``; without either, locking
  fails, kdbench warns once and runs without locks. GPFS and CephFS lock across machines; BeeGFS only with
  ``tuneUseGlobalFileLocks``.

Under a multi-process launch (``accelerate launch``, the deepspeed launcher) only the main process takes the
lock and decides whether to build or reuse; every process follows its answer. A stage every process must
take part in (training, sharded generation) is then built by all of them, each in its own staging folder,
and the main process's folder becomes the entry; the others are discarded. The other processes wait for the
decision, and for the entry, at collective operations, so a launch waits for another worker's stage at most
the launch's barrier timeout (``kdbench.distributed.BARRIER_TIMEOUT``).

Every entry is checked before its first use in a run: ``manifest.json``, written at publication, holds the size and
sha256 of each of its files (``kdbench.grid.manifest``). The main process checks an entry once per run (reading
every byte: about a second per GB); an entry that no longer matches (a crashed copy, a full disk, a bad network
write) is moved aside whole to ``<root>/.corrupt/<kind>/<key>-<time>/``, with a message naming both folders, and
built again as if it had never been published. ``kdbench cache verify`` checks every entry of a cache.

``claim`` is the same protocol for anything one worker should do once: the executor claims a cell's
evaluation with the cell's own lock (``kdbench.results.store.cell_lock``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.grid.manifest import MANIFEST, RECORD, Verdict, check_entry, write_manifest
from kdbench.results.store import FileLock, host
from kdbench.runtime import say

CORRUPT = ".corrupt"  # where corrupt entries are moved, <root>/.corrupt/<kind>/<key>-<time>: kept for a person to look at


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE_DIR", Path.home() / ".cache" / "kdbench"))


@contextmanager
def claim(lock_path: Path, done: Callable[[], bool], what: str,
          on_claim: Callable[[], None] | None = None) -> Iterator[bool]:
    """Whether this launch must make ``what``: False when ``done()`` says it exists, made by an earlier run or
    by another worker while this one waited for ``lock_path``. While the answer is True the main process holds
    the lock; every process of a launch gets the main process's answer. ``on_claim`` runs on the main process
    once it holds the lock and before any process starts (to clear what a killed worker left)."""
    lock: FileLock | None = None
    make = False
    if distributed.is_main() and not done():
        lock = FileLock(lock_path, what)
        lock.acquire()
        try:
            make = not done()  # another worker may have made it while this one waited
            if make and lock.held and on_claim is not None:
                on_claim()
        except BaseException:
            lock.release()
            raise
        if not make:
            lock.release()
            lock = None
    make = distributed.gather_objects(make)[0]  # the main process's answer, on every process
    try:
        yield make
    finally:
        if lock is not None:
            lock.release()


def _published(entry: Path) -> bool:
    return (entry / RECORD).is_file()


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        # (folder, device, inode) → what checking it found: each entry is read whole once per run. The inode tells a
        # folder that another worker has since moved aside and built again from the one checked.
        self._verdicts: dict[tuple[str, int, int], Verdict] = {}

    def entry(self, kind: str, key: str) -> Path:
        """The folder a stage's entry is published in."""
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """Whether the entry is published (a worker may be building it now; this does not wait)."""
        return _published(self.entry(kind, key))

    def lock_path(self, kind: str, key: str) -> Path:
        # Outside <root>/<kind>/, whose every folder is an entry or a staging folder.
        return self.root / ".locks" / kind / f"{key}.lock"

    def entries(self) -> Iterator[tuple[str, str]]:
        """(kind, key) of every published entry, by kind and key."""
        for kind_folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if kind_folder.is_dir() and not kind_folder.name.startswith("."):
                for folder in sorted(kind_folder.iterdir()):
                    if not folder.name.startswith(".") and _published(folder):
                        yield kind_folder.name, folder.name

    def verdict(self, kind: str, key: str) -> Verdict:
        """What checking the published entry against its manifest finds; checked once per run and folder."""
        final = self.entry(kind, key)
        status = final.stat()
        identity = (str(final), status.st_dev, status.st_ino)
        if identity not in self._verdicts:
            self._verdicts[identity] = check_entry(final)
        return self._verdicts[identity]

    def _usable(self, kind: str, key: str) -> bool:
        """Published and not corrupt (an entry without a manifest is used unchecked)."""
        try:
            return _published(self.entry(kind, key)) and self.verdict(kind, key).state != "corrupt"
        except FileNotFoundError:  # moved aside by another worker between the two looks
            return False

    def set_aside(self, kind: str, key: str, problem: str) -> Path:
        """Move a corrupt entry whole to ``<root>/.corrupt/<kind>/``, out of every reader's way; returns where."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.root / CORRUPT / kind / f"{key}-{stamp}"
        if aside.exists():  # set aside twice in one second
            aside = aside.with_name(f"{aside.name}-{host()}-{os.getpid()}")
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.entry(kind, key), aside)
        (aside / "problem.txt").write_text(problem + "\n")
        return aside

    def _set_aside_if_corrupt(self, kind: str, key: str) -> None:
        """Before building an entry: the corrupt one it replaces is moved aside, with a message."""
        final = self.entry(kind, key)
        if not _published(final):
            return
        verdict = self.verdict(kind, key)
        if verdict.state == "corrupt":
            try:
                aside = self.set_aside(kind, key, verdict.problem)
            except FileNotFoundError:
                return  # another worker (on a filesystem without locks) moved it first
            say(f"the cache entry {final} is corrupt ({verdict.problem}): moved aside to {aside}; building it again.")

    def get_or_build(self, kind: str, key: str, record: dict[str, Any], build: Callable[[Path], None],
                     collective: bool = False) -> tuple[Path, bool]:
        """The entry's folder and whether it was reused; ``build(folder)`` fills a new one and ``record`` is
        written beside it as ``inputs.json``. ``collective`` stages are built by every process (see the module
        docstring); others by the main process only. A corrupt entry is moved aside and built again."""
        final = self.entry(kind, key)
        with claim(self.lock_path(kind, key), lambda: self._usable(kind, key), f"the {kind} stage {key}",
                   on_claim=lambda: self._discard_leftovers(kind, key)) as make:
            if make:
                if distributed.is_main():
                    self._set_aside_if_corrupt(kind, key)  # under the key's lock where the filesystem has locks
                if collective or distributed.is_main():
                    self._build(final, record, build)
                distributed.barrier()  # every process sees the published entry before any moves on
        if not _published(final):
            raise KdbenchError(
                f"process {distributed.rank()} cannot see the cache entry {final} that the main process wrote. "
                "Every process of a multi-node run must share the cache folder: set KDBENCH_CACHE_DIR (or --cache-dir) "
                "to a shared filesystem.")
        return final, not make

    def _build(self, final: Path, record: dict[str, Any], build: Callable[[Path], None]) -> None:
        # host and pid: processes of one launch on several machines may share a pid
        staging = final.parent / f".building-{final.name}-{host()}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            build(staging)
            if distributed.is_main():
                (staging / RECORD).write_text(json.dumps({**record, "manifest": MANIFEST}, indent=2, sort_keys=True,
                                                         default=str))
                write_manifest(staging)
                self._publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        try:
            os.replace(staging, final)  # fails on a non-empty folder: never replaces a published entry
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _published(final):
            return  # a worker without a working lock published it first: its entry stays, this copy goes
        # An unfinished entry without inputs.json (from a kdbench before staging folders): moved aside whole, so
        # no reader ever sees it half deleted, then replaced.
        aside = final.parent / f".discarded-{final.name}-{host()}-{os.getpid()}"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(staging, final)

    def _discard_leftovers(self, kind: str, key: str) -> None:
        """Staging folders of ``key`` that killed workers left: nobody else builds it while this worker holds
        the key's lock, and the processes of its own launch have not started yet."""
        for leftover in (self.root / kind).glob(f".building-{key}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


@dataclass(frozen=True)
class EntryCheck:
    """One entry as ``kdbench cache verify`` found it."""

    kind: str
    key: str
    folder: Path
    verdict: Verdict
    moved_to: Path | None = None  # where a corrupt entry went, when asked to move it aside


def verify_cache(cache: StageCache, repair: bool = False) -> list[EntryCheck]:
    """Every published entry of ``cache`` checked against its manifest; with ``repair`` the corrupt ones are moved
    aside (``StageCache.set_aside``), so the next run builds them again."""
    checks = []
    for kind, key in cache.entries():
        verdict = cache.verdict(kind, key)
        moved_to = None
        if repair and verdict.state == "corrupt":
            try:
                moved_to = cache.set_aside(kind, key, verdict.problem)
            except FileNotFoundError:
                continue  # a run found it corrupt first and moved it aside itself
        checks.append(EntryCheck(kind, key, cache.entry(kind, key), verdict, moved_to))
    return checks
