"""Evaluation sets of the MiniLLM data release (SelfInst, Vicuna, S-NI, UnNI) from local JSONL files.

The release (Hugging Face dataset repos ``MiniLLM/self-inst``, ``MiniLLM/Vicuna``, ``MiniLLM/sinst``,
``MiniLLM/uinst``) stores each set as one ``valid.jsonl``, which MiniLLM's evaluation uses as its test
set. A row holds ``prompt`` (the Alpaca prompt, newlines written as the literal ``<n>``), ``output``
(the gold response, or a list of acceptable ones: all are references, the first is the response),
``instruction`` and ``input``. The sets carry no training data, so ``train`` is empty.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench import hookimpl
from kdbench.data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, DatasetSpec, Record, Splits, format_prompt, normalize_record
from kdbench.errors import KdbenchError

OPTIONS = ("path",)
FILE_NAME = "valid.jsonl"
NEWLINE_MARK = "<n>"  # the release writes every newline of a prompt as this literal


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching exactly the prompts ``template`` produces, capturing its fields.

    Built from kdbench's own templates, so parsing stays the inverse of ``format_prompt``. The
    instruction is matched lazily: an input may itself contain ``### Input:`` lines, an instruction
    practically never does.
    """
    pieces = re.split(r"(\{instruction\}|\{input\})", template)
    fields = {"{instruction}": r"(?P<instruction>.*?)", "{input}": r"(?P<input>.*)"}
    return re.compile("".join(fields.get(piece, re.escape(piece)) for piece in pieces), re.DOTALL)


# The two templates start differently, so at most one of them matches a prompt.
TEMPLATE_PATTERNS = (_template_pattern(PROMPT_WITH_INPUT), _template_pattern(PROMPT_NO_INPUT))


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """``(instruction, input)`` of an Alpaca prompt (newlines already restored), or None if it is not one."""
    for pattern in TEMPLATE_PATTERNS:
        match = pattern.fullmatch(prompt)
        if match:
            return match["instruction"], match.groupdict().get("input") or ""
    return None


def _string_field(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None or isinstance(value, str):
        return value
    raise KdbenchError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r}. "
                       "Expected a row of the MiniLLM release: prompt, output, instruction, input.")


def _references(row: dict[str, Any], where: str) -> list[str]:
    """Every acceptable answer; MiniLLM scores the best match over them and trains on the first."""
    output = row.get("output")
    if isinstance(output, str):
        return [output]
    if isinstance(output, list) and output and all(isinstance(item, str) for item in output):
        return list(output)
    raise KdbenchError(f"{where}: 'output' must be a string or a non-empty list of strings, got {output!r} "
                       f"(row keys {sorted(row)}). Each row of the release needs its gold response in 'output'.")


def _instruction_and_input(row: dict[str, Any], prompt: str | None, where: str) -> tuple[str, str, bool]:
    """The row's instruction and input, and whether ``format_prompt`` rebuilds the release's prompt from them.

    The prompt is what MiniLLM's models were evaluated on, so it decides: the row's own fields are
    used when they rebuild it exactly, else the fields parsed from the prompt when those do.
    """
    candidates: list[tuple[str, str]] = []
    instruction = _string_field(row, "instruction", where)
    if instruction is not None:
        candidates.append((instruction, _string_field(row, "input", where) or ""))
    parsed = parse_prompt(prompt) if prompt is not None else None
    if parsed is not None:
        candidates.append(parsed)
    if not candidates:
        found = "a 'prompt' outside the Alpaca template" if prompt is not None else "neither 'instruction' nor 'prompt'"
        raise KdbenchError(
            f"{where}: the row has {found} (keys {sorted(row)}), so its instruction cannot be recovered. Expected "
            "'instruction' (and 'input'), or a 'prompt' in the Alpaca template of kdbench.data (newlines as "
            f"{NEWLINE_MARK!r}); fix the row or re-download the release."
        )
    if prompt is None:
        return *candidates[0], True
    for candidate_instruction, candidate_input in candidates:
        if format_prompt({"instruction": candidate_instruction, "context": candidate_input}) == prompt:
            return candidate_instruction, candidate_input, True
    return *candidates[0], False


def parse_row(row: Any, task: str, where: str) -> tuple[Record, bool]:
    """One release row as a kdbench record (instruction, context, response, references, task), and
    whether ``format_prompt`` of that record is exactly the row's prompt."""
    if not isinstance(row, dict):
        raise KdbenchError(f"{where}: expected a JSON object per line, got {type(row).__name__}.")
    prompt = _string_field(row, "prompt", where)
    prompt = prompt.replace(NEWLINE_MARK, "\n") if prompt is not None else None
    references = _references(row, where)
    instruction, context, rebuilt = _instruction_and_input(row, prompt, where)
    record = normalize_record({"instruction": instruction, "context": context, "response": references[0],
                               "references": references, "task": task}, where)
    return record, rebuilt


@dataclass(frozen=True)
class ReleaseSet:
    """One evaluation set of the release: where it is published and which folder of it the papers use."""

    name: str
    title: str
    hub_repo: str
    subfolder: str  # inside the downloaded repo; S-NI and UnNI keep the ≥ 11-token subset in 11_/
    summary: str

    @property
    def local_dir(self) -> str:
        return f"data/{self.hub_repo.split('/')[1].lower()}"

    @property
    def folder(self) -> str:
        return f"{self.local_dir}/{self.subfolder}" if self.subfolder else self.local_dir

    def download_hint(self) -> str:
        return (f"Download the release with `huggingface-cli download {self.hub_repo} --repo-type dataset "
                f"--local-dir {self.local_dir}` and give `path: {self.folder}` (or its {FILE_NAME}).")

    @property
    def description(self) -> str:
        return (f"{self.title}: {self.summary}; evaluation only (validation = test = the release's {FILE_NAME}). "
                f"Option path: folder {self.folder} of {self.hub_repo}, or its {FILE_NAME}")

    def resolve(self, options: dict[str, Any]) -> Path:
        """The JSONL file the ``path`` option names: the file itself, or ``valid.jsonl`` in a folder."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise KdbenchError(f"data.options {unknown} are not options of {self.name}; expected some of {list(OPTIONS)}.")
        if options.get("path") in (None, ""):
            raise KdbenchError(f"dataset {self.name} needs data.options.path, the local copy of {self.title}; "
                               f"got options {options}. {self.download_hint()}")
        path = Path(str(options["path"])).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise KdbenchError(f"data.options.path {str(path)!r} of {self.name} does not exist; expected "
                               f"a {FILE_NAME} file or a folder holding one. {self.download_hint()}")
        if (path / FILE_NAME).is_file():
            return path / FILE_NAME
        # Pointing at the top of a downloaded repo is the likely slip: name the folders that do hold the file.
        nested = sorted(str(found.parent) for found in path.glob(f"*/{FILE_NAME}"))
        hint = f" Folders below it that do: {nested}." if nested else ""
        raise KdbenchError(f"folder {str(path)!r} given as data.options.path of {self.name} holds no {FILE_NAME}.{hint} "
                           f"Give the file, or the folder holding it. {self.download_hint()}")

    def load(self, options: dict[str, Any]) -> Splits:
        """The records of ``valid.jsonl`` as both evaluation splits; no training records."""
        path = self.resolve(options)
        records: list[Record] = []
        unrebuilt = 0
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise KdbenchError(f"{where}: not valid JSON ({error.msg}); expected one object per line, as in "
                                       f"the release's {FILE_NAME}. Re-download the file if it was cut short.") from None
                record, rebuilt = parse_row(row, self.name, where)
                records.append(record)
                unrebuilt += not rebuilt
        if not records:
            raise KdbenchError(f"{path} ({self.name}) holds no records; expected one JSON object per line. "
                               f"{self.download_hint()}")
        if unrebuilt:
            # Not an error: the row is still usable, but the model sees a prompt the papers' models did not.
            warnings.warn(f"{path}: for {unrebuilt} of {len(records)} rows, kdbench's Alpaca template does not rebuild "
                          "the row's prompt exactly (e.g. an input with surrounding whitespace, which format_prompt "
                          "strips); those rows are evaluated with the prompt rebuilt from their instruction and input.",
                          stacklevel=2)
        # Separate lists: a caller trimming one split must not trim the other.
        return {"train": [], "validation": list(records), "test": list(records)}


RELEASE = (
    ReleaseSet("selfinst", "SelfInst", "MiniLLM/self-inst", "",
               "user-oriented instructions of Self-Instruct (Wang et al. 2023); 252 in the papers"),
    ReleaseSet("vicuna", "Vicuna", "MiniLLM/Vicuna", "",
               "the Vicuna evaluation questions; 80 in the papers"),
    ReleaseSet("sinst", "S-NI", "MiniLLM/sinst", "11_",
               "Super-NaturalInstructions test set, the subset whose gold response has ≥ 11 tokens (as reported)"),
    ReleaseSet("uinst", "UnNI", "MiniLLM/uinst", "11_",
               "Unnatural Instructions core set, the subset whose gold response has ≥ 11 tokens (as reported)"),
)


@hookimpl
def kdbench_register_datasets() -> list[DatasetSpec]:
    return [DatasetSpec(release.name, release.description, release.load, OPTIONS) for release in RELEASE]
