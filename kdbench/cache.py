"""Stage outputs keyed by everything they depend on, so a second run reuses them.

An entry is a folder ``<root>/<stage>/<key>/``; ``key`` hashes the stage's inputs (settings and the
keys of the stages it reads), and ``inputs.json`` inside records them. Entries are built in a
temporary folder and renamed into place, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdbench.config import config_hash

# Bump when a stage's output format or meaning changes, so old entries are not reused.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE_DIR", Path.home() / ".cache" / "kdbench"))


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, stage: str, inputs: dict[str, Any]) -> str:
        return config_hash({"stage": stage, "cache_version": CACHE_VERSION, **inputs})

    def get_or_build(self, stage: str, inputs: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The entry's folder and whether it was reused; ``build(folder)`` fills a new one."""
        key = self.key(stage, inputs)
        final = self.root / stage / key
        if (final / "inputs.json").is_file():
            return final, True
        staging = self.root / stage / f".building-{key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            build(staging)
            (staging / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
            shutil.rmtree(final, ignore_errors=True)  # an unfinished entry without inputs.json
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final, False
