"""Plain-text corpora for the pre-training LM term (``lm_data``): OpenWebText, as MiniLLM trains with.

MiniLLM adds ``lm_coef × [(1 − r)·CE + r·word-KD]`` on OpenWebText to its policy-gradient loss
(``minillm/minillm/trainer.py:287``), and DPKD adds a pre-training loss as well (docs/protocols.md, "The
released recipes"). A corpus is only text: it has no instruction splits, so it serves as ``lm_data``, never as
``data``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from kdbench import hookimpl
from kdbench.data import DatasetSpec, Splits
from kdbench.errors import KdbenchError

HUB_NAME = "Skylion007/openwebtext"
OPTIONS = ("path", "max_documents")


def not_instructions(options: dict[str, Any]) -> Splits:
    raise KdbenchError("openwebtext is a plain-text corpus without instructions; use it as lm_data (the pre-training "
                       "LM term), and an instruction set such as dolly or tiny as data.")


def read_text_files(folder: Path) -> list[str]:
    """A local copy: ``.txt`` files (one document each) and ``.jsonl`` files (a ``text`` field per line)."""
    documents: list[str] = []
    for file in sorted(folder.rglob("*")):
        if file.suffix == ".txt":
            documents.append(file.read_text(encoding="utf-8"))
        elif file.suffix == ".jsonl":
            documents += [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not documents:
        raise KdbenchError(f"lm_data path {folder} holds no .txt or .jsonl (with a 'text' field) documents.")
    return documents


def openwebtext(options: dict[str, Any]) -> list[str]:
    """Documents of a local copy (``path``: a folder of .txt / .jsonl files) or of the hub's OpenWebText, streamed;
    the first ``max_documents`` of them."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise KdbenchError(f"lm_data.options {unknown} are not options of openwebtext; expected some of {list(OPTIONS)}.")
    limit = options.get("max_documents")
    path = Path(str(options.get("path", "")))
    if options.get("path") and path.is_dir():
        return read_text_files(path)[:limit]
    import datasets

    try:
        stream = datasets.load_dataset(str(options.get("path", HUB_NAME)), split="train", streaming=True)
        return [row["text"] for row in itertools.islice(stream, limit)]
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise KdbenchError(f"could not load OpenWebText ({error}). Give lm_data.options.path as a local folder of .txt "
                           "or .jsonl files, or allow hub downloads (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).") from None


@hookimpl
def kdbench_register_datasets() -> list[DatasetSpec]:
    return [DatasetSpec("openwebtext", "OpenWebText, the pre-training corpus of MiniLLM's LM term (lm_data only): the "
                        "hub's copy streamed, or a local folder of .txt / .jsonl files", not_instructions, OPTIONS,
                        corpus=openwebtext)]
