"""Stage outputs keyed by everything they depend on, so a second run reuses them.

An entry is a folder ``<root>/<kind>/<key>/``; ``key`` is the stage's key in the stage graph (its
settings, code version and parents' keys, ``kdbench.grid.graph``), and ``inputs.json`` inside records
the node. Entries are built in a temporary folder and renamed into place, so a killed run never leaves
a half-written entry.

Under a multi-process launch only the main process writes an entry. A stage every process must
take part in (training, sharded generation) is built by all of them, each in its own staging
folder, and the main process's folder becomes the entry; the others are discarded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdbench import distributed
from kdbench.errors import KdbenchError


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE_DIR", Path.home() / ".cache" / "kdbench"))


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get_or_build(self, kind: str, key: str, record: dict[str, Any], build: Callable[[Path], None],
                     collective: bool = False) -> tuple[Path, bool]:
        """The entry's folder and whether it was reused; ``build(folder)`` fills a new one and ``record`` is
        written beside it as ``inputs.json``. ``collective`` stages are built by every process (see the module
        docstring); others by the main process only."""
        final = self.root / kind / key
        if (final / "inputs.json").is_file():
            return final, True
        if collective or distributed.is_main():
            staging = self.root / kind / f".building-{key}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                build(staging)
                if distributed.is_main():
                    (staging / "inputs.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
                    shutil.rmtree(final, ignore_errors=True)  # an unfinished entry without inputs.json
                    os.replace(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        if not (final / "inputs.json").is_file():
            raise KdbenchError(
                f"process {distributed.rank()} cannot see the cache entry {final} that the main process wrote. "
                "Every process of a multi-node run must share the cache folder: set KDBENCH_CACHE_DIR (or --cache-dir) "
                "to a shared filesystem.")
        return final, False
