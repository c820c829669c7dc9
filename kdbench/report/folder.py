"""Reading a results folder: every cell's ``result.json`` and, beside a scored one, ``examples.json``,
``config.json`` and ``samples.json``.

Each cell writes ``<run_dir>/cells/<family>/<student>/<method>/seed<k>/`` (``kdbench.results.store``). Reading
nothing but those files means a report can be rebuilt at any time, from a partial run, or on another machine,
without re-running anything. Nothing is skipped silently: a file that is not valid JSON, of another schema
version or of the wrong shape raises KdbenchError naming it, so a leaderboard never quietly drops a cell.

A report may be read while runs write the folder: it reads finished cells only. A cell without ``result.json``
has not finished (every file is written atomically, ``result.json`` last); a cell a worker is evaluating now (it
holds the cell's lock, ``kdbench.results.store.cell_lock``) is left out even if an earlier ``result.json`` is
there, since its other files are being replaced, and is listed in ``ResultsFolder.in_progress``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.results.schema import SCHEMA_VERSION, CellExamples, check_examples, check_result
from kdbench.results.store import cell_dir, cell_locks, lock_is_held

_RESULT_GLOB = "cells/**/result.json"
CellId = tuple[str, str, str, int]  # family, student, method, training seed


def cell_id(result: dict[str, Any]) -> CellId:
    return str(result["family"]), str(result["student"]), str(result["method"]), int(result["train_seed"])


@dataclass(frozen=True)
class ResultsFolder:
    """What a report is built from."""

    path: Path
    results: list[dict[str, Any]]
    examples: dict[CellId, CellExamples]  # every scored cell's per-example scores
    configs: dict[CellId, dict[str, Any]]  # each cell's resolved settings (only published numbers read them)
    in_progress: tuple[str, ...] = ()  # cells a worker is evaluating now, as paths under cells/: not read

    def cell_path(self, result: dict[str, Any]) -> Path:
        return cell_dir(self.path, *cell_id(result))


def load_folder(run_dir: Path) -> ResultsFolder:
    """Every cell's result and settings, and every scored cell's per-example scores (which it must have)."""
    run_dir = Path(run_dir)
    results, busy = _finished_results(run_dir)
    cells = {cell_id(r): (r, cell_dir(run_dir, *cell_id(r))) for r in results}
    examples = {key: _read_examples(path / "examples.json") for key, (r, path) in cells.items() if r["status"] == "ok"}
    configs = {key: _read_json_object(path / "config.json", "the cell's settings") for key, (_, path) in cells.items()
               if (path / "config.json").is_file()}
    return ResultsFolder(run_dir, results, examples, configs, tuple(p.relative_to(run_dir / "cells").as_posix()
                                                                     for p in busy))


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Read every ``cells/**/result.json`` under ``run_dir``, sorted by path, but those of cells in progress."""
    return _finished_results(run_dir)[0]


def _finished_results(run_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """The results of the finished cells, and the cells in progress (whose results, if any, are left out)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdbenchError(
            f"Run directory {str(run_dir)!r} does not exist; expected a directory written by "
            "`kdbench run`. Run `kdbench run` first or pass the right run directory."
        )
    busy = cells_in_progress(run_dir)
    result_paths = sorted(path for path in run_dir.glob(_RESULT_GLOB) if path.parent not in busy)
    if not result_paths:
        running = f" {len(busy)} cells are being evaluated now; run the report again when one has finished." if busy else ""
        raise KdbenchError(
            f"No results found: searched {str(run_dir / _RESULT_GLOB)!r} and found no finished "
            f"result.json files. Run `kdbench run` first (each finished cell writes one).{running}"
        )
    return [_read_result(path) for path in result_paths], busy


def cells_in_progress(run_dir: Path) -> list[Path]:
    """The cell folders under ``run_dir`` whose lock a worker holds now (evaluating them, or writing why not)."""
    return [cell for cell, lock in cell_locks(Path(run_dir)).items() if lock_is_held(lock)]


def load_samples(path: Path) -> list[dict[str, Any]]:
    """A cell's ``samples.json`` (prompt, response, reference per entry); [] when the cell has none."""
    if not path.is_file():
        return []
    samples = _read_json(path, "a list of samples")
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise KdbenchError(f"{str(path)!r} holds no list of samples; expected [{{prompt, response, reference}}, ...].")
    return samples


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdbenchError(f"{str(path)!r} is missing; expected {what} beside the cell's result.json (schema "
                           f"{SCHEMA_VERSION}). Re-run that cell.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KdbenchError(
            f"{str(path)!r} is not valid JSON ({error}); expected {what} (schema_version {SCHEMA_VERSION}). "
            "Delete it and re-run that cell."
        ) from error


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    payload = _read_json(path, what)
    if not isinstance(payload, dict):
        raise KdbenchError(f"{str(path)!r} holds a JSON {type(payload).__name__}; expected a JSON object ({what}).")
    return payload


def _check_version(path: Path, payload: dict[str, Any]) -> None:
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise KdbenchError(
            f"{str(path)!r} has schema_version {payload.get('schema_version')!r}; expected "
            f"{SCHEMA_VERSION}. It was written by an incompatible kdbench; re-run that cell."
        )


def _read_result(path: Path) -> dict[str, Any]:
    result = _read_json_object(path, "a result file")
    _check_version(path, result)
    return dict(check_result(result, repr(str(path))))


def _read_examples(path: Path) -> CellExamples:
    examples = _read_json_object(path, "the cell's per-example scores")
    _check_version(path, examples)
    return check_examples(examples, repr(str(path)))

