"""Where a run's results go, written atomically so a killed run never leaves half a file.

``<out>/cells/<family>/<student>/<method>/seed<k>/`` holds ``result.json`` (``kdbench.results.schema``,
read by ``kdbench.report``), ``examples.json`` (every example's scores, ``CellExamples``), ``config.json`` (the
resolved settings of the cell), ``train_log.jsonl`` and ``samples.json``. ``result.json`` is written last: a cell
is finished when it holds status ``ok`` and the key of the cell's stage in this run's graph.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdbench.results.schema import CellResult


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any, compact: bool = False) -> None:
    """Indented for people to read, or ``compact`` (one line) for the large per-example files."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 2}
    atomic_write_text(path, json.dumps(payload, sort_keys=True, default=str, **layout) + "\n")


def cell_dir(out_dir: Path, family: str, student: str, method: str, seed: int) -> Path:
    return out_dir / "cells" / family / student / method / f"seed{seed}"


def finished_result(directory: Path, key: str) -> CellResult | None:
    """The cell's result if it was scored by exactly this stage (same key, so the same settings, parents and
    code versions); None means (re)run it: absent, unreadable, stale, failed or diverged."""
    path = directory / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return result if isinstance(result, dict) and result.get("key") == key and result.get("status") == "ok" else None


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
