"""What a cache entry held when it was published, so a reader can tell a whole entry from a damaged one.

A stage publishes ``manifest.json`` beside its files: every file of the entry (its path inside the entry, its size
in bytes and its sha256), ``inputs.json`` included, the manifest itself not. ``inputs.json`` names the manifest
(``"manifest": "manifest.json"``), so an entry whose manifest went missing is told apart from one published before
kdbench wrote manifests: the first is corrupt, the second has nothing to be checked against and is used as it is
(``kdbench cache verify`` counts it as "without a manifest"; delete it to have it rebuilt with one).

sha256 because, on CPUs with SHA extensions (AMD Zen, Intel since Ice Lake, ARMv8), it is the standard library's
fastest hash: 850 MB/s on one core of the machine it was measured on, ahead of sha1 (950 MB/s, but broken), blake2b
(550 MB/s) and md5 (460 MB/s). Checking reads every byte, so it is done once per run and entry
(``kdbench.grid.cache.StageCache``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MANIFEST = "manifest.json"
RECORD = "inputs.json"  # the node an entry was built for; written last of its files, it marks the entry published
HASH = "sha256"
MANIFEST_VERSION = 1

EntryState = Literal["ok", "corrupt", "unverified"]


@dataclass(frozen=True)
class Verdict:
    """What checking an entry against its manifest found."""

    state: EntryState  # ok: every file as published; corrupt: see problem; unverified: no manifest to check against
    problem: str = ""  # for a corrupt entry: the first thing found wrong, naming the file


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, HASH).hexdigest()


def entry_files(folder: Path) -> list[Path]:
    """Every file of an entry, by its path inside it, in a fixed order; the manifest itself not."""
    return sorted(path.relative_to(folder) for path in folder.rglob("*")
                  if path.is_file() and path.relative_to(folder) != Path(MANIFEST))


def write_manifest(folder: Path) -> None:
    """Record every file of the (finished) entry in ``folder``: its size and hash."""
    files = {path.as_posix(): {"size": (folder / path).stat().st_size, HASH: file_digest(folder / path)}
             for path in entry_files(folder)}
    payload = {"version": MANIFEST_VERSION, "hash": HASH, "files": files}
    (folder / MANIFEST).write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: Path) -> tuple[Any, str]:
    """The JSON in ``path`` and "", or None and what is wrong with the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path.name} is unreadable ({type(error).__name__}: {error})"


def check_entry(folder: Path) -> Verdict:
    """Whether the published entry in ``folder`` still holds what its manifest recorded: every file there, of its
    size and hash. Sizes are compared first, so a truncated file is found without reading the rest."""
    record, problem = read_json(folder / RECORD)
    if problem:
        return Verdict("corrupt", problem)
    if not isinstance(record, dict) or record.get("manifest") != MANIFEST:
        return Verdict("unverified")
    manifest, problem = read_json(folder / MANIFEST)
    if problem:
        return Verdict("corrupt", problem)
    if not isinstance(manifest, dict) or manifest.get("hash") != HASH or not isinstance(manifest.get("files"), dict):
        return Verdict("corrupt", f"{MANIFEST} does not list the entry's files with their {HASH}")
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return Verdict("corrupt", f"{name} is missing")
        size = path.stat().st_size
        if size != recorded["size"]:
            return Verdict("corrupt", f"{name} has {size} bytes, {recorded['size']} when it was published")
    for name, recorded in files.items():
        if file_digest(folder / name) != recorded[HASH]:
            return Verdict("corrupt", f"{name} has the size it was published with but another {HASH}")
    return Verdict("ok")
