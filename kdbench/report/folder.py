"""Reading a results folder: every cell's ``result.json`` and, beside a scored one, ``examples.json``,
``config.json`` and ``samples.json``.

Each cell writes ``<run_dir>/cells/<family>/<student>/<method>/seed<k>/`` (``kdbench.results.store``). Reading
nothing but those files means a report can be rebuilt at any time, from a partial run, or on another machine,
without re-running anything. Nothing is skipped silently: a cell whose files are not valid JSON, of another schema
version or of the wrong shape (``kdbench.results.cells.read_cell``, the rule by which the runner counts a cell as
finished) is left out of the rows and listed in ``ResultsFolder.invalid`` with the reason, and ``kdbench run`` re-runs
it.

A report may be read while runs write the folder: it reads finished cells only. A cell without ``result.json``
has not finished (every file is written atomically, ``result.json`` last); a cell a worker is evaluating now (it
holds the cell's lock, ``kdbench.results.store.cell_lock``) is left out even if an earlier ``result.json`` is
there, since its other files are being replaced, and is listed in ``ResultsFolder.in_progress``. The cells of the
grid a run set out to make (``grid.json``, written as it starts) that have no result yet are counted in
``ResultsFolder.unfinished``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.results.cells import CellFiles, read_cell, read_json
from kdbench.results.schema import CellExamples
from kdbench.results.store import cell_dir, cell_locks, grid_cells, lock_is_held

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
    invalid: tuple[tuple[str, str], ...] = ()  # (cell path under cells/, why) of cells whose files cannot be read
    unfinished: tuple[str, ...] = ()  # cells of the recorded grid with no result yet (training, queued or stopped)

    def cell_path(self, result: dict[str, Any]) -> Path:
        return cell_dir(self.path, *cell_id(result))


def load_folder(run_dir: Path) -> ResultsFolder:
    """Every readable cell's result and settings, and every scored cell's per-example scores (which it must have)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdbenchError(
            f"Run directory {str(run_dir)!r} does not exist; expected a directory written by "
            "`kdbench run`. Run `kdbench run` first or pass the right run directory."
        )
    busy = cells_in_progress(run_dir)
    folders = sorted(path.parent for path in run_dir.glob(_RESULT_GLOB) if path.parent not in busy)
    cells: list[CellFiles] = []
    invalid: list[tuple[str, str]] = []
    for folder in folders:
        try:
            cells.append(read_cell(folder))
        except KdbenchError as error:
            invalid.append((folder.relative_to(run_dir / "cells").as_posix(), str(error)))
    if not cells:
        running = f" {len(busy)} cells are being evaluated now; run the report again when one has finished." if busy else ""
        unreadable = f" {len(invalid)} cannot be read: {invalid[0][1]}" if invalid else ""
        raise KdbenchError(
            f"No results found: searched {str(run_dir / _RESULT_GLOB)!r} and found no finished, readable "
            f"result.json files. Run `kdbench run` first (each finished cell writes one).{running}{unreadable}"
        )
    results = [dict(cell.result) for cell in cells]
    examples = {cell_id(r): cell.examples for r, cell in zip(results, cells) if cell.examples is not None}
    configs = {cell_id(r): cell.config for r, cell in zip(results, cells) if cell.config is not None}
    in_progress = tuple(p.relative_to(run_dir / "cells").as_posix() for p in busy)
    written = {folder.relative_to(run_dir / "cells").as_posix() for folder in folders}  # readable or not
    unfinished = tuple(cell for cell in grid_cells(run_dir) if cell not in written and cell not in in_progress)
    return ResultsFolder(run_dir, results, examples, configs, in_progress, tuple(invalid), unfinished)


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """The readable results under ``run_dir``, sorted by path, but those of cells in progress."""
    return load_folder(run_dir).results


def cells_in_progress(run_dir: Path) -> list[Path]:
    """The cell folders under ``run_dir`` whose lock a worker holds now (evaluating them, or writing why not)."""
    return [cell for cell, lock in cell_locks(Path(run_dir)).items() if lock_is_held(lock)]


def load_samples(path: Path) -> list[dict[str, Any]]:
    """A cell's ``samples.json`` (prompt, response, reference per entry); [] when the cell has none."""
    if not path.is_file():
        return []
    samples = read_json(path, "a list of samples")
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise KdbenchError(f"{str(path)!r} holds no list of samples; expected [{{prompt, response, reference}}, ...].")
    return samples
