"""Datasets: the embedded tiny suite, and local JSONL files in Dolly's schema (the path a local
copy of Dolly takes at paper scale)."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdbench import hookimpl
from kdbench.data import DatasetSpec, Splits, load_jsonl_splits, normalize_record
from kdbench.errors import KdbenchError
from kdbench.tinysuite import TinySuiteOptions, generate, world_corpus

TINY_OPTIONS = tuple(f.name for f in dataclasses.fields(TinySuiteOptions))


def tiny_options(options: dict[str, Any]) -> TinySuiteOptions:
    unknown = sorted(set(options) - set(TINY_OPTIONS))
    if unknown:
        raise KdbenchError(f"data.options {unknown} are not options of the tiny suite; expected some of {list(TINY_OPTIONS)}.")
    return TinySuiteOptions(**options)


def load_tiny(options: dict[str, Any]) -> Splits:
    splits = generate(tiny_options(options))
    return {name: [normalize_record(r, f"tiny/{name}") for r in records] for name, records in splits.items()}


@hookimpl
def kdbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec("tiny", "deterministic synthetic instruction suite (facts, descriptions, open-ended lists; "
                    "reverse, sort, add as options); CPU-sized; as lm_data, plain text about the same world",
                    load_tiny, TINY_OPTIONS,
                    corpus=lambda options: world_corpus(tiny_options(options)),
                    version=2),  # 2: no algorithmic tasks by default; descriptions without the name
        DatasetSpec("jsonl", "local JSONL files in Dolly's schema: options dir, or train/validation/test paths",
                    load_jsonl_splits, ("dir", "train", "validation", "test")),
    ]
