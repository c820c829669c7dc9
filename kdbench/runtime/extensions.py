"""Build locks of compiled ops that cannot strand a run.

DeepSpeed compiles small C++ ops on first use (on the CPU, its shared-memory communication op) with torch's
``cpp_extension``, which guards each op's build folder with an empty ``lock`` file: the builder creates it, keeps it
open while it compiles and deletes it when done; every other process sleeps while it exists, silently and for ever.
A builder killed mid-compile (Ctrl-C, SIGKILL, a preempted job) leaves the file behind, and every later run sleeps on
it. ``clear_build_locks`` runs before DeepSpeed's first use in a process: a lock that no process holds is removed,
and one that is held is waited on with a message every ``REPORT_EVERY`` seconds.

Who holds a lock is read from ``/proc``: the builder has the file open, and ninja and the compiler run inside the
folder. That sees only this machine, so on a network filesystem (a shared home on a cluster) a lock without a
local holder is only taken for stale once nothing in its folder has changed for ``SHARED_QUIET_SECONDS``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPORT_EVERY = 30.0
SHARED_QUIET_SECONDS = 600.0  # longer than any compile step of DeepSpeed's ops writes nothing into the folder
# Filesystem types another machine may write to (from /proc/self/mountinfo)
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs", "9p",
                       "afs", "panfs", "wekafs", "fuse")


def default_extensions_root() -> Path:
    """torch's own choice without ``TORCH_EXTENSIONS_DIR``: ``<build root>/py<ver>_<cpu|cuXY|rocmXY>``."""
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        device = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}"


def extensions_root() -> Path:
    """The folder whose subfolders torch builds ops in (one per op, each with its ``lock`` while building)."""
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(given) if given else default_extensions_root()


def lock_holders(lock: Path) -> list[int]:
    """This machine's processes that hold ``lock``: the builder that has it open, or a compiler or ninja running in
    its folder. Processes of other users whose ``/proc`` entries cannot be read are not seen."""
    target, folder = os.path.realpath(lock), os.path.realpath(lock.parent)
    holders = []
    for process in Path("/proc").glob("[0-9]*"):
        if int(process.name) == os.getpid():
            continue
        try:
            if os.readlink(process / "cwd") == folder or any(
                    os.readlink(fd) == target for fd in (process / "fd").iterdir()):
                holders.append(int(process.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return holders


def on_network_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a filesystem another machine may write to (True when it cannot be told)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return True
    resolved, best, fstype = os.path.realpath(path), "", ""
    for line in mounts:  # "<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> <source> ..."
        fields = line.split()
        mount_point, kind = fields[4], fields[fields.index("-") + 1]
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype.split(".")[0] in NETWORK_FILESYSTEMS


def last_change(folder: Path) -> float:
    """When anything in ``folder`` last changed (a build in progress keeps writing objects there)."""
    times = [folder.stat().st_mtime]
    for item in folder.iterdir():
        try:
            times.append(item.stat().st_mtime)
        except OSError:
            continue
    return max(times)


def describe(pid: int) -> str:
    try:
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = ""
    return f"process {pid}" + (f" ({command.strip()[:120]})" if command.strip() else "")


def clear_build_locks(say: Callable[[str], None], root: Path | None = None, report_every: float = REPORT_EVERY,
                      poll_seconds: float = 0.5) -> None:
    """Remove every op build lock under ``root`` (default: torch's) that no process holds, and wait, saying so
    every ``report_every`` seconds, for each one that is held until its holder lets it go."""
    root = extensions_root() if root is None else root
    for lock in sorted(root.glob("*/lock")):
        waited_since, reported_at = time.monotonic(), -math.inf
        while lock.exists():
            holders = lock_holders(lock)
            quiet = time.time() - last_change(lock.parent)
            if not holders and (quiet >= SHARED_QUIET_SECONDS or not on_network_filesystem(lock)):
                try:
                    lock.unlink()
                except FileNotFoundError:
                    break  # its builder finished just now
                say(f"Removed the stale build lock {lock}: no process holds it (a build of this op was killed before "
                    "it finished); the op is rebuilt if it is incomplete.")
                break
            now = time.monotonic()
            if now - reported_at >= report_every:
                reported_at = now
                who = ", ".join(describe(pid) for pid in holders) if holders else (
                    f"no process on this machine, but its folder (on a network filesystem) changed {quiet:.0f} s ago, "
                    f"so another machine may be building it; taken for stale after {SHARED_QUIET_SECONDS:.0f} s quiet")
                say(f"Waiting {now - waited_since:.0f} s for the build lock {lock}, held by {who}. If no build of this "
                    f"op is running, stop this run, delete the lock (rm {lock}) and run again.")
            time.sleep(poll_seconds)

