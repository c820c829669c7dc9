"""Tests never touch the network: nothing here may download weights or data sets."""

import os
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def subprocess_env() -> Callable[..., dict[str, str]]:
    """``subprocess_env(KEY=value, ...)``: this process's environment, offline, for a `kdbench` subprocess.
    (kdbench restores whatever process state a stage changes, so there is nothing of earlier tests to undo.)"""

    def make(**extra: str) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}

    return make


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real tokenizer, a tiny teacher and student (GPT-2 family) saved as HF folders, and data."""
    # imported here: transformers reads the offline settings above when it is first imported
    from kdbench.data import TEMPLATE_PIECES, format_prompt, tokenize_records
    from kdbench.tinysuite import TinySuiteOptions, generate
    from kdbench.zoo import TinyArch, build_tiny_model, load_tokenizer, train_tokenizer
    from kdbench_plugins.families import GPT2

    root = tmp_path_factory.mktemp("tiny")
    splits = generate(TinySuiteOptions(n_train=300, n_validation=10, n_test=10))
    train_tokenizer((format_prompt(r) + r["response"] for r in splits["train"]), 400, root / "tok", TEMPLATE_PIECES)
    tokenizer = load_tokenizer(str(root / "tok"))
    build_tiny_model(GPT2, TinyArch(32, 2, 2), tokenizer, 64, 0, root / "teacher")
    build_tiny_model(GPT2, TinyArch(16, 1, 1), tokenizer, 64, 1, root / "student")
    examples = tokenize_records(splits["train"], tokenizer, 64, 48)
    return {"root": root, "tokenizer": tokenizer, "examples": examples}
