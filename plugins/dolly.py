"""Dolly (databricks-dolly-15k) with the papers' processing, from the hub or a local copy.

MiniLLM and DPKD hold out 1K validation and 500 test records with a fixed seed and drop records
whose prompt exceeds the maximum prompt length (``data.max_prompt_length`` tokens, applied by the
runner with each family's tokenizer, for training and evaluation alike).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kdbench import hookimpl
from kdbench.data import DatasetSpec, Record, Splits, normalize_record
from kdbench.errors import KdbenchError

HUB_NAME = "databricks/databricks-dolly-15k"
OPTIONS = ("path", "n_validation", "n_test", "split_seed")
DOLLY_RECORDS = 15_011  # records in databricks-dolly-15k (its dataset card)


def read_dolly(path: str) -> list[dict[str, Any]]:
    """Raw records from a local JSON/JSONL file, a saved ``datasets`` folder, or a hub name."""
    import datasets

    local = Path(path)
    try:
        if local.is_file():
            table = datasets.load_dataset("json", data_files=str(local), split="train")
        elif local.is_dir() and (local / "dataset_info.json").is_file():
            table = datasets.load_from_disk(str(local))
        else:
            table = datasets.load_dataset(path, split="train")
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise KdbenchError(
            f"could not load Dolly from {path!r}: {error}. Give data.options.path as a local copy "
            f"(the {HUB_NAME} JSONL file, or a folder saved with datasets' save_to_disk), or allow hub "
            "downloads (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."
        ) from None
    return [dict(row) for row in table]


def held_out(options: dict[str, Any]) -> tuple[int, int]:
    """Records held out for validation and for test (1,000 and 500, as MiniLLM and DPKD do)."""
    return int(options.get("n_validation", 1000)), int(options.get("n_test", 500))


def dolly_sizes(options: dict[str, Any]) -> dict[str, int]:
    """Split sizes of the hub's Dolly under ``options`` (train 13,511 by default), before the prompt-length
    filter; a local copy given by ``path`` may hold another number of records."""
    n_validation, n_test = held_out(options)
    return {"train": DOLLY_RECORDS - n_validation - n_test, "validation": n_validation, "test": n_test}


def load_dolly(options: dict[str, Any]) -> Splits:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise KdbenchError(f"data.options {unknown} are not options of dolly; expected some of {list(OPTIONS)}.")
    path = str(options.get("path", HUB_NAME))
    n_validation, n_test = held_out(options)
    records: list[Record] = [normalize_record(raw, f"{path} record {i}") for i, raw in enumerate(read_dolly(path))]
    if len(records) <= n_validation + n_test:
        raise KdbenchError(f"{path} holds {len(records)} records; holding out {n_validation} for validation and "
                           f"{n_test} for test leaves none to train on. Lower data.options n_validation / n_test.")
    random.Random(int(options.get("split_seed", 1234))).shuffle(records)
    return {"test": records[:n_test], "validation": records[n_test:n_test + n_validation],
            "train": records[n_test + n_validation:]}


@hookimpl
def kdbench_register_datasets() -> list[DatasetSpec]:
    return [DatasetSpec("dolly", "databricks-dolly-15k from the hub or a local copy: 1K validation and 500 test "
                        "held out with a fixed seed (MiniLLM / DPKD processing)", load_dolly, OPTIONS,
                        documented_sizes=dolly_sizes)]
