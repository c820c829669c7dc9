"""Where a run's results go, written atomically so a killed run never leaves half a file.

``<out>/cells/<family>/<student>/<method>/seed<k>/`` holds ``result.json`` (``kdbench.results.schema``,
read by ``kdbench.report``), ``examples.json`` (every example's scores, ``CellExamples``), ``config.json`` (the
resolved settings of the cell), ``train_log.jsonl`` and ``samples.json``. ``result.json`` is written last: a cell
is finished when it holds status ``ok`` and the key of the cell's stage in this run's graph.

Several workers may share a results folder or a stage cache (two ``kdbench run``s, cluster jobs), so every file
is published by a rename (readers see all of it or none), and ``FileLock`` makes one worker at a time build a
cache entry or evaluate a cell (``kdbench.grid.cache`` says what is guaranteed on which filesystem).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.results.cells import read_cell
from kdbench.results.schema import CellResult
from kdbench.runtime import say

# flock's answer on a filesystem that cannot lock (NFS mounted with nolock on some kernels, Lustre without
# -o flock, some FUSE filesystems): the run goes on without locks, see FileLock.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_POLL_SECONDS = (0.2, 5.0)  # a waiting worker retries the lock this often, backing off from the first to the second
_LOCKS = ".locks"  # lock files, kept forever (deleting one would let two workers lock two files of one name)
_NOT_YET = object()  # no holder announced yet
_unlockable: set[str] = set()  # filesystems (lock folders) already warned about, so the warning is said once


class StorageFull(OSError):
    """A write that found its filesystem full (or the user's quota spent); the message names the folder, its free
    space and the size of the write. An OSError, so a stage that runs into it fails like any other."""


def storage_full(error: OSError, path: Path, needed: int | None = None) -> OSError:
    """``error`` as a ``StorageFull`` when the disk was full, else ``error`` itself."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    free = shutil.disk_usage(folder).free
    size = f" of {needed:,} bytes" if needed is not None else ""
    return StorageFull(error.errno, f"no space left for a write{size} to {path}: {free:,} bytes free on the filesystem "
                       f"of {folder}. Free some space there (or point --out / KDBENCH_CACHE_DIR at a larger disk) and "
                       "run the same command again; finished cells are kept")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing. A full disk raises
    ``StorageFull``."""
    try:
        _atomic_write_text(path, text)
    except OSError as error:
        raise storage_full(error, path, len(text.encode("utf-8"))) from None


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, new_file_mode())  # mkstemp makes it 0600; a results file is as readable as any other
        except OSError:
            pass  # a filesystem without modes (some SMB mounts): its own mode is all there is
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask: 0o644 under umask 022."""
    try:  # Linux says the umask without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_json(path: Path, payload: Any, compact: bool = False) -> None:
    """Indented for people to read, or ``compact`` (one line) for the large per-example files."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 2}
    atomic_write_text(path, json.dumps(payload, sort_keys=True, default=str, **layout) + "\n")


def cell_dir(out_dir: Path, family: str, student: str, method: str, seed: int) -> Path:
    return out_dir / "cells" / family / student / method / f"seed{seed}"


def cell_lock(directory: Path) -> Path:
    """The lock a worker holds while it evaluates the cell in ``directory`` (a ``cell_dir``) or writes why it could
    not: ``<out>/.locks/cells/<family>/<student>/<method>/seed<k>.lock``, so a cell's folder holds its results only."""
    out = directory.parents[4]
    return out / _LOCKS / directory.relative_to(out).with_suffix(".lock")


GRID_FILE = "grid.json"  # every cell the runs on this results folder set out to make (paths under cells/)


def record_grid(out_dir: Path, cells: list[str]) -> None:
    """Add ``cells`` (paths under ``cells/``) to the grid this results folder is for, before a run starts, so that a
    report taken meanwhile counts the cells that have no result yet."""
    known = set(grid_cells(out_dir))
    if not set(cells) <= known:
        atomic_write_json(out_dir / GRID_FILE, {"cells": sorted(known | set(cells))})


def grid_cells(out_dir: Path) -> list[str]:
    """The cells the runs on ``out_dir`` set out to make; [] when none said (a folder from an older kdbench)."""
    try:
        recorded = json.loads((out_dir / GRID_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    cells = recorded.get("cells") if isinstance(recorded, dict) else None
    return [cell for cell in cells if isinstance(cell, str)] if isinstance(cells, list) else []


def cell_locks(out_dir: Path) -> dict[Path, Path]:
    """Every cell folder under ``out_dir`` that has a lock file (held or not), with that file."""
    locks = sorted((out_dir / _LOCKS / "cells").glob("**/*.lock"))
    return {out_dir / lock.relative_to(out_dir / _LOCKS).with_suffix(""): lock for lock in locks}


def finished_result(directory: Path, key: str, unreadable: Callable[[str], None] | None = None) -> CellResult | None:
    """The cell's result if it was scored by exactly this stage (same key, so the same settings, parents and
    code versions) and its files read as a report reads them (``kdbench.results.cells.read_cell``); None means
    (re)run it: absent, unreadable, incomplete, stale, failed or diverged. ``unreadable`` is told why, when the
    files are there but cannot be read so."""
    if not (directory / "result.json").is_file():
        return None
    try:
        result = read_cell(directory).result
    except KdbenchError as error:
        if unreadable is not None:
            unreadable(str(error))
        return None
    return result if result.get("key") == key and result.get("status") == "ok" else None


def host() -> str:
    return socket.gethostname() or "localhost"


class FileLock:
    """An exclusive lock on ``path``, held by the kernel (``flock``) until ``release`` or until this process
    dies, however it dies: a killed worker's lock is free at once, so there is no stale lock to take over.

    While held, the file says who holds it (host, pid, since when); a worker that waits says whom it waits
    for. On a filesystem that cannot lock, ``acquire`` warns once and returns with ``held`` False: the caller
    goes on unlocked (its writes are still atomic, only a second worker may repeat the work).
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what  # for the waiting message: "the train stage 1f2e…", "cell gpt2/s1/kd/seed0"
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Read-write: NFS clients lock by byte ranges on the server, and an exclusive one needs write access.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise KdbenchError(
                f"Cannot create the lock file {self.path} ({error.strerror or error}); expected a folder this user "
                "can write to. Point KDBENCH_CACHE_DIR (or --out) at a writable folder.") from None
        try:
            self._wait(fd)
        except OSError as error:
            os.close(fd)
            if error.errno not in _NO_LOCKS:
                raise KdbenchError(f"Cannot lock {self.path} ({error.strerror or error}) for {self.what}; expected "
                                   "a filesystem with file locks. Check the folder's permissions.") from None
            if str(self.path.parent) not in _unlockable:
                _unlockable.add(str(self.path.parent))
                say(f"warning: the filesystem of {self.path.parent} cannot lock files ({error.strerror}); workers "
                     "sharing it may build one stage or evaluate one cell twice (each copy is published whole). "
                     "To share it between workers, mount it with locks (NFS: without nolock or local_lock; "
                     "Lustre: -o flock).")
            return
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.held = fd, True
        owner = json.dumps({"host": host(), "pid": os.getpid(), "since": now_iso()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner, 0)

    def _wait(self, fd: int) -> None:
        delay, tries = _POLL_SECONDS[0], 0
        announced: object = _NOT_YET
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                tries += 1
            # Polling, not a blocking flock: NFS grants blocked locks by a callback that firewalls may drop,
            # and the holder may change while this one waits (then it is said again). A lock file that names
            # nobody at the first try is a holder that has not written its name yet, or a report looking.
            owner = lock_owner(self.path)
            if owner != announced and (owner is not None or tries > 1):
                announced = owner
                say(f"waiting for {self.what}: {describe_owner(owner)} is making it (lock {self.path}); "
                     "it is reused once published, or made here if that worker stops first.")
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_SECONDS[1])

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it (a leftover owner means a killed holder)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor releases the lock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_owner(path: Path) -> dict[str, Any] | None:
    """Who the lock file says holds it; None when it says nothing readable (free, or just being taken)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "another worker"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (since {owner.get('since', '?')})"


def lock_is_held(path: Path) -> bool:
    """Whether some worker holds the lock ``path`` now; asks without taking it for more than a moment and
    without creating the file, so a reader with no write access to the folder can ask."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a holder's exclusive lock
    except BlockingIOError:
        return True
    except OSError:
        return False  # a filesystem without locks: nobody can be holding one
    finally:
        os.close(fd)
    return False


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when a GPU is used."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def library_versions() -> dict[str, str]:
    import accelerate
    import deepspeed
    import torch
    import transformers

    import kdbench

    return {"kdbench": kdbench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
