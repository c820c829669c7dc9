"""Instruction records, the Alpaca prompt template, local JSONL loading and tokenisation.

A record is Dolly's schema: ``instruction``, ``context`` (called ``input`` in Alpaca files),
``response``, plus ``references`` (every acceptable answer; defaults to ``[response]``) and an
optional ``task`` label used to break scores down.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import KdbenchError

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# The constant parts of both templates, in the order they appear.
TEMPLATE_PIECES = (
    PROMPT_NO_INPUT.split("{instruction}")[0],
    PROMPT_WITH_INPUT.split("{instruction}")[0],
    "\n\n### Input:\n",
    "\n\n### Response:\n",
)

SPLITS = ("train", "validation", "test")
Record = dict[str, Any]
Splits = dict[str, list[Record]]


@dataclass(frozen=True)
class DatasetSpec:
    """A named data source: ``load(options)`` returns train/validation/test record lists."""

    name: str
    description: str
    load: Callable[[dict[str, Any]], Splits]
    option_names: tuple[str, ...] = field(default=())
    # Split sizes (records, before any prompt-length filter) that the source documents for these
    # options: what ``kdbench run --dry-run`` plans with when ``load`` cannot run (offline).
    documented_sizes: Callable[[dict[str, Any]], dict[str, int]] | None = None
    # Plain text for the pre-training LM term (``lm_data``): MiniLLM's OpenWebText, the tiny suite's world.
    corpus: Callable[[dict[str, Any]], list[str]] | None = None
    # The task labels its records carry for these options (what ``controls`` and the per-task scores name), known
    # without loading the records; None when only the records can tell (a JSONL file's ``task`` fields).
    tasks: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    # Part of every stage key built on this data: bump it when the same options start to give other records, so
    # a cache made by the old generator is not read as the new one.
    version: int = 1


def format_prompt(record: Record) -> str:
    """The Alpaca-style prompt both papers evaluate with; the response follows it, then EOS."""
    context = str(record.get("context") or "").strip()
    if context:
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=context)
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def prompt_ids(record: Record, tokenizer: Any) -> list[int]:
    """The token ids of a record's prompt: the one tokenisation that training, student samples, rollouts,
    stored teacher generations, evaluation and the prompt-length filters share. No BOS or other special
    token, even from a tokenizer that adds one by default (OPT's ``</s>``), as MiniLLM's preprocessing
    (``minillm/tools/process_data_dolly.py:53-54``) does for every model."""
    return list(tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"])


def prompt_fits(record: Record, tokenizer: Any, max_prompt_length: int) -> bool:
    """Whether a record's prompt is within ``data.max_prompt_length`` tokens: longer ones are left out of training
    and evaluation (as both papers drop them), not cut."""
    return len(prompt_ids(record, tokenizer)) <= max_prompt_length


def normalize_record(raw: dict[str, Any], where: str) -> Record:
    """Accept Dolly (``context``) and Alpaca (``input``) spellings; check the required fields."""
    missing = [key for key in ("instruction", "response") if not isinstance(raw.get(key), str)]
    if missing:
        raise KdbenchError(
            f"{where}: record is missing string field(s) {missing}; got keys {sorted(raw)}. "
            "Expected Dolly's schema: instruction, context (or input), response, optional references."
        )
    references = raw.get("references") or [raw["response"]]
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise KdbenchError(f"{where}: 'references' must be a list of strings, got {references!r}.")
    return {
        "instruction": raw["instruction"],
        "context": str(raw.get("context", raw.get("input", "")) or ""),
        "response": raw["response"],
        "references": references,
        "task": str(raw.get("task", raw.get("category", "")) or ""),
    }


def read_jsonl(path: Path) -> list[Record]:
    if not path.is_file():
        raise KdbenchError(f"data file {path} does not exist; expected a JSONL file with one record per line.")
    records: list[Record] = []
    with path.open("rb") as handle:  # bytes, decoded a line at a time: a decoding error then has its line number
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise KdbenchError(
                    f"{path}:{line_number}: not UTF-8 (byte {raw_line[error.start]:#04x} at column {error.start + 1}); "
                    f"expected UTF-8 text. Convert the file, e.g. iconv -f latin1 -t utf-8 {path} > utf8.jsonl (with its "
                    "real encoding after -f)."
                ) from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise KdbenchError(f"{path}:{line_number}: not valid JSON ({error.msg}); expected one object per line.") from None
            records.append(normalize_record(raw, f"{path}:{line_number}"))
    if not records:
        raise KdbenchError(f"data file {path} holds no records.")
    return records


def load_jsonl_splits(options: dict[str, Any]) -> Splits:
    """Local JSONL files: either ``{train, validation, test}`` paths or a ``dir`` holding ``<split>.jsonl``."""
    if "dir" in options:
        paths = {split: Path(options["dir"]) / f"{split}.jsonl" for split in SPLITS}
    else:
        paths = {split: Path(options[split]) for split in SPLITS if split in options}
    missing = [split for split in SPLITS if split not in paths]
    if missing:
        raise KdbenchError(
            f"the jsonl dataset needs a path for every split; missing {missing} in options {options}. "
            "Give `dir: <folder with train.jsonl, validation.jsonl, test.jsonl>` or one path per split."
        )
    return {split: read_jsonl(path) for split, path in paths.items()}


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    prompt_length: int  # tokens before the response; the loss mask starts here


def tokenize_records(
    records: Iterable[Record], tokenizer: Any, max_length: int, max_prompt_length: int
) -> list[TokenizedExample]:
    """``prompt_ids`` + response + EOS, truncated to ``max_length``; prompts longer than the bound are
    dropped (as both papers do), not cut, so the model never sees a prompt without its instruction's end."""
    examples: list[TokenizedExample] = []
    for record in records:
        prompt = prompt_ids(record, tokenizer)
        if len(prompt) > max_prompt_length:
            continue
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(TokenizedExample((prompt + response_ids)[:max_length], len(prompt)))
    return examples


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; ``response_mask`` marks the tokens the loss is taken on (response + EOS)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        response_mask[row, example.prompt_length:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, bucket_factor: int = 16
) -> list[list[int]]:
    """Shuffle, then sort within buckets of ``bucket_factor`` batches so a batch holds similar lengths:
    far less padding than random batches, still a different order every epoch. Every batch holds exactly
    ``batch_size`` examples (the epoch's remainder waits for the next shuffle), so an optimizer step is the
    same number of sequences whichever method reads it."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if len(order) >= batch_size:
        order = order[: len(order) - len(order) % batch_size]
    span = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def tokenize_corpus(texts: Iterable[str], tokenizer: Any, max_length: int, max_chunks: int | None = None
                    ) -> list[TokenizedExample]:
    """Plain text for the pre-training LM term: the texts joined by EOS and cut into ``max_length``-token chunks
    (every token a loss token: ``prompt_length`` 0), as MiniLLM packs its OpenWebText; at most ``max_chunks``."""
    chunks: list[TokenizedExample] = []
    buffer: list[int] = []
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        while len(buffer) >= max_length:
            chunks.append(TokenizedExample(buffer[:max_length], 0))
            buffer = buffer[max_length:]
            if max_chunks is not None and len(chunks) >= max_chunks:
                return chunks
    return chunks
