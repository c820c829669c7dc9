"""The MiniLLM release's evaluation sets, offline: small files in the release's exact row schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kdbench.data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, TEMPLATE_PIECES, format_prompt, tokenize_records
from kdbench.errors import KdbenchError
from kdbench.registry import load_registries
from kdbench_plugins.instruct_eval import RELEASE, parse_prompt

SETS = {release.name: release for release in RELEASE}


def release_prompt(instruction: str, input_text: str = "") -> str:
    """A prompt as the release stores it: the Alpaca template with every newline written ``<n>``."""
    template = PROMPT_WITH_INPUT if input_text else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input_text).replace("\n", "<n>")


# The release's rows: prompt, instruction, input, output (a string or a list of acceptable strings).
ROWS: list[dict[str, Any]] = [
    {"prompt": "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.<n><n>### Instruction:<n>Name the three primary colors.<n><n>### Response:<n>",
     "instruction": "Name the three primary colors.", "input": "", "output": "Red, yellow and blue."},
    {"prompt": release_prompt("Translate the sentence into French.\nKeep the tone.", "The cat sleeps."),
     "instruction": "Translate the sentence into French.\nKeep the tone.", "input": "The cat sleeps.",
     "output": ["Le chat dort.", "Le chat est en train de dormir."]},
    {"prompt": release_prompt("Summarize the passage.", "Line one.\n\nLine two, after a blank line."),
     "instruction": "Summarize the passage.", "input": "Line one.\n\nLine two, after a blank line.",
     "output": ["Two lines."]},
    {"prompt": release_prompt("Write a haiku about rain."), "instruction": "Write a haiku about rain.", "input": "",
     "output": "Soft rain on the roof\nthe garden drinks quietly\nclouds move on at dusk"},
]
# Rows without instruction / input: both are recovered from the prompt.
PROMPT_ONLY_ROWS: list[dict[str, Any]] = [
    {"prompt": release_prompt("Classify the review as positive or negative.", "Great phone, awful battery."),
     "output": ["mixed", "negative"]},
    {"prompt": release_prompt("List two prime numbers."), "output": "2 and 3"},
]


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def sinst_dir(tmp_path: Path) -> Path:
    """``data/sinst/11_/`` as ``huggingface-cli download MiniLLM/sinst`` leaves it, with a blank line at the end."""
    write_rows(tmp_path / "data" / "sinst" / "11_" / "valid.jsonl", ROWS + PROMPT_ONLY_ROWS + [""])
    return tmp_path / "data" / "sinst" / "11_"


def test_registered_through_the_entry_point() -> None:
    registries = load_registries()
    for name, release in SETS.items():
        assert name in registries.datasets and "entry point" in registries.datasets.origin(name)
        spec = registries.datasets.get(name)
        assert spec.option_names == ("path",)
        assert release.folder in spec.description and release.hub_repo in spec.description
    assert {name: SETS[name].folder for name in SETS} == {
        "selfinst": "data/self-inst", "vicuna": "data/vicuna", "sinst": "data/sinst/11_", "uinst": "data/uinst/11_"}


def test_folder_and_file_give_evaluation_only_splits(sinst_dir: Path) -> None:
    splits = SETS["sinst"].load({"path": str(sinst_dir)})
    assert splits == SETS["sinst"].load({"path": str(sinst_dir / "valid.jsonl")})
    assert splits["train"] == [] and splits["validation"] == splits["test"]
    assert splits["validation"] is not splits["test"]
    records = splits["test"]
    assert len(records) == len(ROWS) + len(PROMPT_ONLY_ROWS)
    for record, row in zip(records, ROWS + PROMPT_ONLY_ROWS):
        outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        assert record["references"] == outputs and record["response"] == outputs[0]
        assert record["task"] == "sinst"
        if "instruction" in row:
            assert (record["instruction"], record["context"]) == (row["instruction"], row["input"])
    assert (records[-2]["instruction"], records[-2]["context"]) == (
        "Classify the review as positive or negative.", "Great phone, awful battery.")
    assert (records[-1]["instruction"], records[-1]["context"]) == ("List two prime numbers.", "")


def test_records_rebuild_the_release_prompt_and_tokenize(sinst_dir: Path) -> None:
    """The key property: kdbench shows the model exactly the prompt the release evaluates with."""
    from kdbench.zoo import train_tokenizer

    records = SETS["sinst"].load({"path": str(sinst_dir)})["test"]
    prompts = [row["prompt"].replace("<n>", "\n") for row in ROWS + PROMPT_ONLY_ROWS]
    assert [format_prompt(record) for record in records] == prompts
    tokenizer = train_tokenizer([p + r["response"] for p, r in zip(prompts, records)], 300,
                                sinst_dir.parent / "tokenizer", TEMPLATE_PIECES)
    examples = tokenize_records(records, tokenizer, max_length=512, max_prompt_length=256)
    assert len(examples) == len(records)
    for example, prompt, record in zip(examples, prompts, records):
        assert tokenizer.decode(example.input_ids[:example.prompt_length]) == prompt
        assert tokenizer.decode(example.input_ids[example.prompt_length:-1]) == record["response"]
        assert example.input_ids[-1] == tokenizer.eos_token_id


def test_the_prompt_decides_when_the_row_fields_disagree(tmp_path: Path) -> None:
    """The prompt is what the papers' models saw; fields that do not rebuild it give way to it."""
    row = {"prompt": release_prompt("Name a fruit."), "instruction": "Name a fruit.<n>", "input": "", "output": "Apple"}
    record = SETS["vicuna"].load({"path": str(write_rows(tmp_path / "valid.jsonl", [row]))})["test"][0]
    assert record["instruction"] == "Name a fruit." and format_prompt(record) == row["prompt"].replace("<n>", "\n")


def test_prompts_the_template_cannot_rebuild_are_reported(tmp_path: Path) -> None:
    """format_prompt strips the input, so an input with outer whitespace cannot come back exactly."""
    row = {"prompt": release_prompt("Echo the input.", " padded "), "instruction": "Echo the input.",
           "input": " padded ", "output": "padded"}
    path = write_rows(tmp_path / "valid.jsonl", [row, ROWS[0]])
    with pytest.warns(UserWarning, match="1 of 2 rows"):
        records = SETS["selfinst"].load({"path": str(path)})["test"]
    assert records[0]["context"] == " padded "


def test_parse_prompt_accepts_only_the_template() -> None:
    assert parse_prompt(PROMPT_WITH_INPUT.format(instruction="A", input="B\n\n### Input:\nC")) == ("A", "B\n\n### Input:\nC")
    assert parse_prompt(PROMPT_NO_INPUT.format(instruction="A\n\nB")) == ("A\n\nB", "")
    assert parse_prompt("Question: what is 2 + 2?\nAnswer:") is None
    assert parse_prompt(PROMPT_NO_INPUT.format(instruction="A") + "trailing") is None


def test_missing_path_says_how_to_download(tmp_path: Path) -> None:
    for name, command, folder in [("sinst", "MiniLLM/sinst", "data/sinst/11_"), ("vicuna", "MiniLLM/Vicuna", "data/vicuna")]:
        with pytest.raises(KdbenchError, match="needs data.options.path") as error:
            SETS[name].load({})
        message = str(error.value)
        assert f"huggingface-cli download {command} --repo-type dataset --local-dir {folder.removesuffix('/11_')}" in message
        assert f"path: {folder}" in message


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(KdbenchError, match="does not exist") as error:
        SETS["uinst"].load({"path": str(tmp_path / "nowhere")})
    assert "nowhere" in str(error.value) and "MiniLLM/uinst" in str(error.value)
    # The top of a downloaded repo: the error points at the 11_ folder below it.
    write_rows(tmp_path / "uinst" / "11_" / "valid.jsonl", ROWS)
    with pytest.raises(KdbenchError, match="holds no valid.jsonl") as error:
        SETS["uinst"].load({"path": str(tmp_path / "uinst")})
    assert str(tmp_path / "uinst" / "11_") in str(error.value)
    with pytest.raises(KdbenchError, match=r"\['pth'\] are not options of uinst"):
        SETS["uinst"].load({"pth": str(tmp_path)})


def test_file_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "valid.jsonl", [ROWS[0], "", '{"prompt": "cut short'])
    with pytest.raises(KdbenchError, match=re.escape(f"{path}:3: not valid JSON")):
        SETS["selfinst"].load({"path": str(path)})
    write_rows(path, ["", "  "])
    with pytest.raises(KdbenchError, match="holds no records"):
        SETS["selfinst"].load({"path": str(path)})
    write_rows(path, [ROWS[0], {"prompt": "Q: 2 + 2?<n>A:", "output": "4"}])
    with pytest.raises(KdbenchError, match=re.escape(f"{path}:2: the row has a 'prompt' outside the Alpaca template")):
        SETS["selfinst"].load({"path": str(path)})
    write_rows(path, [{"output": "4"}])
    with pytest.raises(KdbenchError, match=re.escape(f"{path}:1: the row has neither 'instruction' nor 'prompt'")):
        SETS["selfinst"].load({"path": str(path)})
    for output in (None, [], [1]):
        write_rows(path, [{**ROWS[0], "output": output}])
        with pytest.raises(KdbenchError, match=re.escape(f"{path}:1: 'output' must be a string or a non-empty list")):
            SETS["selfinst"].load({"path": str(path)})
    write_rows(path, [["not", "an", "object"]])
    with pytest.raises(KdbenchError, match="expected a JSON object per line"):
        SETS["selfinst"].load({"path": str(path)})
