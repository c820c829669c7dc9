"""The prompt template, JSONL loading, tokenisation and batching (the tiny suite itself: test_tinysuite.py)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.data import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    TEMPLATE_PIECES,
    TokenizedExample,
    collate,
    format_prompt,
    length_grouped_batches,
    load_jsonl_splits,
    read_jsonl,
    tokenize_records,
)
from kdbench.errors import KdbenchError
from kdbench.tinysuite import TinySuiteOptions, generate

Splits = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def small_suite() -> Splits:
    """A small suite for tokenizer tests."""
    return generate(TinySuiteOptions(n_train=300, n_validation=20, n_test=60))


@pytest.fixture(scope="module")
def tokenizer(small_suite: Splits, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 400-token BPE trained by kdbench.zoo on a few hundred generated records."""
    from kdbench.zoo import train_tokenizer

    texts = [format_prompt(r) + str(r["response"]) for r in small_suite["train"]]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"), TEMPLATE_PIECES)


# -- prompt template -----------------------------------------------------------------------------

def test_format_prompt_without_input() -> None:
    """The Alpaca template (docs/evaluation.md, "Prompt template"), character for character, when the context is empty."""
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_prompt({"instruction": "Say hi.", "context": ""}) == expected
    assert format_prompt({"instruction": "Say hi."}) == expected
    assert format_prompt({"instruction": "Say hi.", "context": "   "}) == expected
    assert PROMPT_NO_INPUT.format(instruction="Say hi.") == expected


def test_format_prompt_with_input() -> None:
    """The with-input template: '... paired with an input ...' and an Input section."""
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\nSort.\n\n"
                "### Input:\n3 1 2\n\n### Response:\n")
    assert format_prompt({"instruction": "Sort.", "context": "3 1 2"}) == expected
    assert PROMPT_WITH_INPUT.format(instruction="Sort.", input="3 1 2") == expected


def test_template_pieces_cover_the_constant_text() -> None:
    """Removing the pieces from a formatted prompt leaves only the instruction and input."""
    prompt = format_prompt({"instruction": "INSTR", "context": "CTX"})
    assert prompt == TEMPLATE_PIECES[1] + "INSTR" + TEMPLATE_PIECES[2] + "CTX" + TEMPLATE_PIECES[3]
    prompt = format_prompt({"instruction": "INSTR"})
    assert prompt == TEMPLATE_PIECES[0] + "INSTR" + TEMPLATE_PIECES[3]


# -- JSONL ---------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write one JSON value (or raw string) per line."""
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_accepts_context_or_input(tmp_path: Path) -> None:
    """Dolly's `context` and Alpaca's `input` both land in `context`; references default to [response]."""
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "context": "ctx", "response": "r1"},
        "",
        {"instruction": "b", "input": "inp", "response": "r2", "references": ["r2", "R2"]},
        {"instruction": "c", "response": "r3", "category": "open_qa"},
    ])
    records = read_jsonl(path)
    assert [r["context"] for r in records] == ["ctx", "inp", ""]
    assert [r["references"] for r in records] == [["r1"], ["r2", "R2"], ["r3"]]
    assert records[2]["task"] == "open_qa"


def test_read_jsonl_missing_response_names_file_and_line(tmp_path: Path) -> None:
    """A record without `response` is an error naming path:line."""
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "r"}, {"instruction": "b"}])
    with pytest.raises(KdbenchError, match=re.escape(f"{path}:2")) as info:
        read_jsonl(path)
    assert "response" in str(info.value)


def test_read_jsonl_bad_json_and_bad_references(tmp_path: Path) -> None:
    """Malformed JSON, non-string references, an empty file and a missing file are KdbenchErrors."""
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "r"}, "{not json"])
    with pytest.raises(KdbenchError, match=re.escape(f"{bad}:2")):
        read_jsonl(bad)
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"instruction": "a", "response": "r", "references": [1]}])
    with pytest.raises(KdbenchError, match="references"):
        read_jsonl(refs)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(KdbenchError, match="no records"):
        read_jsonl(empty)
    with pytest.raises(KdbenchError, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_read_jsonl_a_line_that_is_not_utf8_names_file_line_and_byte(tmp_path: Path) -> None:
    """A record saved in Latin-1 among UTF-8 ones (non-ASCII UTF-8 and CRLF line ends read fine): its file, line,
    byte and column, not a bare UnicodeDecodeError."""
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"instruction": "Dis bonjour", "response": "Salut, ça va ?"}, ensure_ascii=False).encode(),
             b"",
             json.dumps({"instruction": "Name a drink", "response": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")]
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    column = lines[2].index(b"\xe9") + 1
    with pytest.raises(KdbenchError, match=re.escape(f"{path}:3: not UTF-8 (byte 0xe9 at column {column})")) as info:
        read_jsonl(path)
    assert "iconv" in str(info.value)
    path.write_bytes(b"\r\n".join(lines[:2]) + b"\r\n")
    assert read_jsonl(path)[0]["response"] == "Salut, ça va ?"


def test_load_jsonl_splits_dir_and_paths(tmp_path: Path) -> None:
    """A `dir` option or one path per split both load; a missing split is an error naming it."""
    for split in ("train", "validation", "test"):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{"instruction": split, "response": "r"}])
    by_dir = load_jsonl_splits({"dir": str(tmp_path)})
    assert {s: [r["instruction"] for r in rs] for s, rs in by_dir.items()} == {
        "train": ["train"], "validation": ["validation"], "test": ["test"]}
    by_path = load_jsonl_splits({s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation", "test")})
    assert by_path == by_dir
    with pytest.raises(KdbenchError, match="validation"):
        load_jsonl_splits({"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")})
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(KdbenchError, match="does not exist"):
        load_jsonl_splits({"dir": str(tmp_path)})


# -- tokenisation ----------------------------------------------------------------------------------

def test_template_pieces_are_single_tokens(tokenizer: Any) -> None:
    """Each constant template piece encodes to exactly one token."""
    for piece in TEMPLATE_PIECES:
        assert len(tokenizer(piece, add_special_tokens=False)["input_ids"]) == 1, repr(piece)


def test_decode_encode_round_trip(tokenizer: Any, small_suite: Splits) -> None:
    """decode(encode(text)) gives the text back for prompts and responses of every task."""
    for record in small_suite["test"]:
        text = format_prompt(record) + str(record["response"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_response_mask_covers_response_and_eos(tokenizer: Any, small_suite: Splits) -> None:
    """The mask marks exactly the response tokens plus EOS; the prompt and padding are not masked in."""
    records = small_suite["test"][:12]  # lists of towns included: with this small BPE, up to ~200 tokens
    examples = tokenize_records(records, tokenizer, max_length=400, max_prompt_length=300)
    assert len(examples) == len(records)
    batch = collate(examples, tokenizer.pad_token_id)
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == attention.shape == mask.shape
    assert mask.dtype == torch.bool
    for row, record in enumerate(records):
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_ids = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
        assert ids[row][mask[row]].tolist() == response_ids
        assert ids[row, : len(prompt_ids)].tolist() == prompt_ids
        assert not mask[row, : len(prompt_ids)].any()
        n = len(prompt_ids) + len(response_ids)
        assert attention[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[row, n:] == tokenizer.pad_token_id).all()
        assert not mask[row, n:].any()
        assert tokenizer.decode(ids[row][mask[row]].tolist()[:-1]) == record["response"]


def test_long_prompts_dropped_and_sequences_truncated(tokenizer: Any, small_suite: Splits) -> None:
    """Prompts longer than max_prompt_length are dropped, not cut; whole sequences are cut to max_length."""
    records = small_suite["test"]
    prompt_lengths = [len(tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"]) for r in records]
    bound = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    assert min(prompt_lengths) <= bound < max(prompt_lengths)
    examples = tokenize_records(records, tokenizer, max_length=bound + 3, max_prompt_length=bound)
    kept = [length for length in prompt_lengths if length <= bound]
    assert [e.prompt_length for e in examples] == kept
    assert all(len(e.input_ids) <= bound + 3 for e in examples)
    assert any(len(e.input_ids) == bound + 3 for e in examples)


def test_collate_uses_example_prompt_length() -> None:
    """With hand-built examples the mask starts at prompt_length and stops at the last real token."""
    batch = collate([TokenizedExample([5, 6, 7, 8], 2), TokenizedExample([9, 10], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]


# -- batching ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch_size", [(1000, 16), (37, 5), (3, 8)])
def test_length_grouped_batches_are_full_and_cover_all_but_the_remainder(n: int, batch_size: int) -> None:
    """Every batch holds exactly batch_size indices (a step is the same number of sequences for every method), each
    index at most once, and only the epoch's remainder (n mod batch_size) waits; fewer than one batch: one short batch."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    batches = length_grouped_batches(lengths, batch_size, generator)
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    if n >= batch_size:
        assert len(flat) == n - n % batch_size and all(len(batch) == batch_size for batch in batches)
    else:
        assert batches == [flat] and len(flat) == n


def test_length_grouped_batches_group_lengths_and_reshuffle() -> None:
    """Batches hold similar lengths (far less spread than random), and another epoch gives another order."""
    n, batch_size = 1024, 16
    lengths = torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    generator = torch.Generator().manual_seed(0)
    epoch1 = length_grouped_batches(lengths, batch_size, generator)
    epoch2 = length_grouped_batches(lengths, batch_size, generator)
    assert epoch1 != epoch2

    def mean_spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    random_batches = [random_order[i:i + batch_size] for i in range(0, n, batch_size)]
    assert mean_spread(epoch1) < 0.25 * mean_spread(random_batches)


def test_options_dataclass_matches_dataset_plugin() -> None:
    """The tiny dataset plugin accepts exactly the TinySuiteOptions fields and loads the same records."""
    from kdbench_plugins.datasets import TINY_OPTIONS, load_tiny

    assert set(TINY_OPTIONS) == {f.name for f in dataclasses.fields(TinySuiteOptions)}
    splits = load_tiny({"n_train": 20, "n_validation": 3, "n_test": 4})
    raw = generate(TinySuiteOptions(n_train=20, n_validation=3, n_test=4))
    assert [r["response"] for r in splits["train"]] == [r["response"] for r in raw["train"]]
    with pytest.raises(KdbenchError, match="seeed"):
        load_tiny({"seeed": 1})


# -- prompts over data.max_prompt_length, in a real run ---------------------------------------------------------

DROP_EXPERIMENT = """
name: drop
protocol: uniform
data: {dataset: jsonl, options: {dir: data}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
init: {start: base}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 8, max_steps: 2}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 8, max_steps: 2}
selection: {every: 2, metric: loss}
methods: {sft: {}}
evaluation: {seeds: [10], max_new_tokens: 8, batch_size: 8}
"""


def write_split(path: Path, n_records: int, n_long: int, rng: random.Random) -> None:
    """``n_records`` short instructions, the first ``n_long`` of them replaced by 60 random words: at least 60
    tokens whatever the tokenizer learnt from them, over the experiment's max_prompt_length of 48."""
    short = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit.", "Name an animal."]
    with path.open("w", encoding="utf-8") as handle:
        for index in range(n_records):
            words = (("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(60)))
            instruction = " ".join(words) if index < n_long else short[index % len(short)]
            handle.write(json.dumps({"instruction": instruction, "response": f"answer {index % 5}"}) + "\n")


@pytest.mark.slow
def test_a_run_says_once_per_split_how_many_prompts_were_too_long(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """3 of 40 training and 1 of 8 validation prompts are too long, none of the test split's: one line each for the
    first two, in the run's output (stderr), none for the third."""
    (tmp_path / "data").mkdir()
    rng = random.Random(0)
    for split, n_records, n_long in (("train", 40, 3), ("validation", 8, 1), ("test", 8, 0)):
        write_split(tmp_path / "data" / f"{split}.jsonl", n_records, n_long, rng)
    (tmp_path / "drop.yaml").write_text(DROP_EXPERIMENT)
    run = subprocess.run([sys.executable, "-m", "kdbench", "run", "-e", "drop.yaml", "--out", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900,
                         env={**subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache")), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    notes = [line for line in run.stderr.splitlines() if "longer than data.max_prompt_length" in line]
    assert notes == [
        f"kdbench: {dropped} of {total} {split} prompts of dataset 'jsonl' are longer than data.max_prompt_length=48 "
        "tokens and are left out (dropped, not cut, as both papers do); raise data.max_prompt_length to keep them."
        for dropped, total, split in ((3, 40, "train"), (1, 8, "validation"))]
