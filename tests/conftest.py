"""Tests never touch the network: nothing here may download weights or data sets."""

import os
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What a launcher (or an in-process DeepSpeed engine, through kdbench.engine.ensure_distributed_env) puts in
# this process's environment. A `kdbench` subprocess that inherited them would take itself for one rank of
# this process's group and try to listen on its MASTER_PORT.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def subprocess_env() -> Callable[..., dict[str, str]]:
    """``subprocess_env(KEY=value, ...)``: an offline environment for a `kdbench` subprocess, as a fresh shell
    would give it, whatever earlier in-process tests set."""

    def make(**extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if key not in LAUNCHER_VARIABLES and not key.startswith("ACCELERATE_")}
        return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}

    return make
