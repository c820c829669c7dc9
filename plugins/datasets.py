"""Datasets: the embedded tiny suite, and local JSONL files in Dolly's schema (the path a local
copy of Dolly takes at paper scale)."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdbench import hookimpl
from kdbench.data import DatasetSpec, Splits, load_jsonl_splits, normalize_record
from kdbench.errors import KdbenchError
from kdbench.tinysuite import TinySuiteOptions, generate, tiny_tasks, world_corpus

TINY_OPTIONS = tuple(f.name for f in dataclasses.fields(TinySuiteOptions))


def tiny_options(options: dict[str, Any]) -> TinySuiteOptions:
    unknown = sorted(set(options) - set(TINY_OPTIONS))
    if unknown:
        raise KdbenchError(f"data.options {unknown} are not options of the tiny suite; expected some of {list(TINY_OPTIONS)}.")
    try:
        suite = TinySuiteOptions(**options)
    except TypeError as error:
        raise KdbenchError(f"data.options {options} are not valid tiny-suite options ({error}).") from None
    problems = suite.check()
    if problems:
        raise KdbenchError(f"data.options of the tiny suite: {'; '.join(problems)}.")
    return suite


def load_tiny(options: dict[str, Any]) -> Splits:
    splits = generate(tiny_options(options))
    return {name: [normalize_record(r, f"tiny/{name}") for r in records] for name, records in splits.items()}


@hookimpl
def kdbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec("tiny", "deterministic synthetic instruction suite with three probe tasks (modes, long, noisy) in "
                    "human or clean gold; CPU-sized; as a corpus, prose about the same world",
                    load_tiny, TINY_OPTIONS,
                    corpus=lambda options: world_corpus(tiny_options(options)),
                    tasks=lambda options: tiny_tasks(tiny_options(options)),
                    version=3),  # 3: the probe tasks (modes, long, noisy) of issue 26
        DatasetSpec("jsonl", "local JSONL files in Dolly's schema: options dir, or train/validation/test paths",
                    load_jsonl_splits, ("dir", "train", "validation", "test")),
    ]
