"""Tests never touch the network: nothing here may download weights or data sets."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PRIVATE_EXTENSIONS = pytest.StashKey[Path]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """DeepSpeed's CPU communication op in a folder of this test run's own, built before any test runs. The suite
    kills runs on purpose, and one killed while compiling the op leaves a lock beside it: kdbench clears such a lock
    (kdbench.runtime.extensions), but the tests' kills stay out of the user's ``~/.cache/torch_extensions``. A copy
    of an op already built there (with no lock beside it) saves the compile."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    from kdbench.runtime.extensions import default_extensions_root

    private = Path(tempfile.mkdtemp(prefix="kdbench-tests-torch-extensions-"))
    # with TORCH_EXTENSIONS_DIR set, ops sit right under it
    for built in default_extensions_root().glob("*/*.so"):
        if not (built.parent / "lock").exists():
            shutil.copytree(built.parent, private / built.parent.name, symlinks=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(private)
    session.config.stash[PRIVATE_EXTENSIONS] = private
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # before any test can kill a process mid-compile


def pytest_sessionfinish(session: pytest.Session) -> None:
    private = session.config.stash.get(PRIVATE_EXTENSIONS, None)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="session")
def small_experiment() -> Callable[..., dict[str, Any]]:
    """``small_experiment(name, methods, engine="accelerate", **blocks)``: the smallest real grid as an experiment
    mapping (GPT-2 family, 120 training records, a two-step teacher, three student steps, one evaluation seed) that
    the tests of whole runs share; ``blocks`` add top-level blocks (``runtime``, ...)."""

    def make(name: str, methods: dict[str, dict[str, Any]], engine: str = "accelerate",
             **blocks: Any) -> dict[str, Any]:
        return {
            "name": name,
            "protocol": "uniform",
            "data": {"dataset": "tiny", "options": {"n_train": 120, "n_validation": 8, "n_test": 8,
                                                    "list_towns": [3, 5]}, "max_length": 64, "max_prompt_length": 48},
            "models": {"scale": "tiny", "families": ["gpt2"]},
            "init": {"start": "base"},
            "teacher": {"training": {"engine": engine, "lr": 3.0e-3, "batch_size": 8, "max_steps": 2}},
            "training": {"engine": engine, "lr": 5.0e-3, "batch_size": 8, "max_steps": 3},
            "selection": {"every": 3, "metric": "loss"},
            "methods": methods,
            "evaluation": {"seeds": [10], "max_new_tokens": 8, "batch_size": 8},
            **blocks,
        }

    return make


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
