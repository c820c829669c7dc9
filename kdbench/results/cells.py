"""A cell's files as a report reads them, and with that the one rule for a finished cell: a cell is finished when
its files pass this reading (``read_cell``), so the runner re-runs exactly the cells a report cannot show.

A cell folder (``kdbench.results.store.cell_dir``) holds ``result.json`` (written last), and beside a scored one
``examples.json`` (every example's scores) and ``config.json`` (its resolved settings); ``samples.json`` is optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.results.schema import SCHEMA_VERSION, CellExamples, CellResult, check_examples, check_result

AGAIN = "`kdbench run` with the same experiment re-runs that cell"


@dataclass(frozen=True)
class CellFiles:
    result: CellResult
    examples: CellExamples | None  # a scored cell's per-example scores; None for a failed or diverged cell
    config: dict[str, Any] | None  # the cell's settings, when written


def read_cell(folder: Path) -> CellFiles:
    """The cell's files, each checked against its schema; KdbenchError naming the first bad file and what is wrong."""
    result = read_result(folder / "result.json")
    examples = read_examples(folder / "examples.json") if result["status"] == "ok" else None
    config_path = folder / "config.json"
    config = read_json_object(config_path, "the cell's settings") if config_path.is_file() else None
    return CellFiles(result, examples, config)


def read_result(path: Path) -> CellResult:
    result = read_json_object(path, "a result file")
    _check_version(path, result)
    return check_result(result, repr(str(path)))


def read_examples(path: Path) -> CellExamples:
    examples = read_json_object(path, "the cell's per-example scores")
    _check_version(path, examples)
    return check_examples(examples, repr(str(path)))


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdbenchError(f"{str(path)!r} is missing; expected {what} beside the cell's result.json (schema "
                           f"{SCHEMA_VERSION}); {AGAIN}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KdbenchError(f"{str(path)!r} is not valid JSON ({error}); expected {what} (schema_version "
                           f"{SCHEMA_VERSION}); {AGAIN}.") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    payload = read_json(path, what)
    if not isinstance(payload, dict):
        raise KdbenchError(f"{str(path)!r} holds a JSON {type(payload).__name__}; expected a JSON object ({what}); "
                           f"{AGAIN}.")
    return payload


def _check_version(path: Path, payload: dict[str, Any]) -> None:
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise KdbenchError(f"{str(path)!r} has schema_version {payload.get('schema_version')!r}; expected "
                           f"{SCHEMA_VERSION}: it was written by an incompatible kdbench; {AGAIN}.")
