"""Process-wide state, set in plain sight and put back afterwards.

Some libraries are configured only through process-wide state: DeepSpeed and torch.distributed read
environment variables, accelerate keeps its state in class attributes, transformers remembers a
ZeRO-3 config globally, torch has one thread count and one global random generator. kdbench changes
these only inside the context managers below, which restore every one of them on the way out, so a
caller (a test, a notebook, the next stage of a grid) finds the process as it left it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


@contextmanager
def environment(values: Mapping[str, str], override: bool = False) -> Iterator[None]:
    """Set environment variables (only those not set already, unless ``override``); on exit the whole
    environment is put back as it was, so whatever a library added inside is gone too."""
    saved = dict(os.environ)
    try:
        for name, value in values.items():
            if override or name not in os.environ:
                os.environ[name] = value
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def command_environment() -> dict[str, str]:
    """What every kdbench command runs under: no fork warnings from the fast tokenizers, and DeepSpeed
    told up front that there is no GPU instead of probing (and warning) when it is first imported."""
    values = {"TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        values["DS_ACCELERATOR"] = "cpu"
    return values


def quiet_libraries() -> None:
    """kdbench draws its own progress; per-file bars from the HF libraries would bury it (every kdbench process:
    the command, and each cluster job)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher_environment() -> dict[str, str]:
    """DeepSpeed always initialises torch.distributed, which reads these. ``accelerate launch`` and the
    deepspeed launcher set them; a plain single-process run gets a world of one."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def _reset_accelerate() -> None:
    # accelerate keeps one state per process in class attributes; every engine of a grid starts afresh.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside and restored on exit: for library calls that
    draw from them and take no generator (``model.generate``, weight initialisation)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def training_state(engine: str, threads: int | None, seed: int) -> Iterator[None]:
    """Everything one training stage changes process-wide, restored on exit: environment variables
    (the launcher's, DeepSpeed's, accelerate's), accelerate's state, transformers' ZeRO-3 registration,
    torch's thread count and its global random generators (seeded with ``seed`` inside: the dropout
    stream of the stage)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    values = command_environment()
    if engine == "deepspeed":
        values.update(launcher_environment())
    saved_threads = torch.get_num_threads()
    with environment(values), seeded(seed):
        _reset_accelerate()
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            # Left set, ZeRO-3's registration makes every later from_pretrained build partitioned (empty) weights.
            unset_hf_deepspeed_config()
            _reset_accelerate()
            torch.set_num_threads(saved_threads)
