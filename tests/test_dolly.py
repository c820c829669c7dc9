"""Dolly with the papers' processing, offline: a small file in databricks-dolly-15k's exact schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.registry import load_registries
from kdbench_plugins.dolly import HUB_NAME, load_dolly

CATEGORIES = ("open_qa", "closed_qa", "brainstorming", "summarization")


@pytest.fixture()
def dolly_file(tmp_path: Path) -> Path:
    path = tmp_path / "databricks-dolly-15k.jsonl"
    rows = [{"instruction": f"Question number {i}?", "context": f"Some context {i}." if i % 3 == 0 else "",
             "response": f"Answer {i}.", "category": CATEGORIES[i % 4]} for i in range(80)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_holds_out_validation_and_test_with_a_fixed_seed(dolly_file: Path) -> None:
    options = {"path": str(dolly_file), "n_validation": 10, "n_test": 5}
    splits = load_dolly(options)
    assert {k: len(v) for k, v in splits.items()} == {"test": 5, "validation": 10, "train": 65}
    keys = {name: {r["instruction"] for r in records} for name, records in splits.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert load_dolly(options) == splits  # the same seed gives the same split
    assert load_dolly({**options, "split_seed": 7})["test"] != splits["test"]
    record = next(r for r in splits["train"] if r["context"])
    assert record["task"] in CATEGORIES and record["references"] == [record["response"]]


def test_is_registered_and_validates_its_options() -> None:
    registries = load_registries()
    assert "dolly" in registries.datasets and "entry point" in registries.datasets.origin("dolly")
    with pytest.raises(KdbenchError, match="not options of dolly"):
        load_dolly({"pth": "x.jsonl"})


def test_too_few_records_is_a_clear_error(dolly_file: Path) -> None:
    with pytest.raises(KdbenchError, match="leaves none to train on"):
        load_dolly({"path": str(dolly_file), "n_validation": 70, "n_test": 10})


def test_hub_name_offline_is_a_clear_error_with_the_fix() -> None:
    """The real hub path is taken (offline in tests): its failure says how to use a local copy."""
    with pytest.raises(KdbenchError, match="local copy") as error:
        load_dolly({"path": HUB_NAME})
    assert HUB_NAME in str(error.value)
