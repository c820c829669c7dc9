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
