"""What a training stage carries from step to step, and its resume checkpoints.

A stage killed at any moment continues from its latest checkpoint with the very weights, optimizer moments, learning
rate, data order, samples and random draws it would have had: a checkpoint holds everything the loop
(``kdbench.train.engine.train``) mutates, so the resumed stage ends bit for bit where an uninterrupted one does
(docs/design.md, "Resume").
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from kdbench.contracts import PromptOrder, State
from kdbench.errors import KdbenchError
from kdbench.train.sources import MicroBatches


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0  # non-padding tokens the student read, all processes
    response_tokens: int = 0  # tokens the loss was taken on, all processes
    student_forwards: int = 0
    teacher_forwards: int = 0
    student_samples: int = 0  # responses sampled from the student during training, all processes (on-policy sources)
    examples: int = 0  # training prompts drawn from the data order (or a source that drives them), all processes
    seconds: float = 0.0  # training time of the steps kept (a killed run's steps after its last checkpoint are not)
    selected_step: int = 0  # the optimizer step whose weights the stage hands on
    validation: list[dict[str, float]] = field(default_factory=list)  # step, value: the curve it was selected on
    log: list[dict[str, float]] = field(default_factory=list)  # per optimizer step: step, loss, lr
    resumed_at: list[int] = field(default_factory=list)  # steps it continued from after an interruption (none: one go)
    first_gradient_rms: float | None = None  # of the distillation term at step 1, per unit it averages over (guards)



CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes: an older one is refused, not misread


@dataclass
class Resumed:
    """Where a stage continues: the optimizer steps done, its stats so far, and the checkpoint selection's state."""

    step: int
    stats: TrainStats
    best_value: float | None
    best_state: dict[str, torch.Tensor] | None


def latest_checkpoint(resume_dir: Path) -> Path | None:
    """The newest checkpoint in ``resume_dir``: a ``step-N`` folder appears only once it is complete."""
    found = sorted(resume_dir.glob("step-*")) if resume_dir.is_dir() else []
    return found[-1] if found else None


def rng_states() -> State:
    """Every process-wide generator: python's, numpy's and torch's (the CPU's and each GPU's: dropout)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: State) -> None:
    numpy = states["numpy"]
    random.setstate(states["python"])
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


class _SharedTensorNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def tied_weights_saved_quietly() -> Iterator[None]:
    """accelerate warns at every save that tied weights (GPT-2's embeddings and LM head) go into safetensors once;
    the resume test reloads them bit for bit, so the warning says nothing at every checkpoint."""
    note, logger = _SharedTensorNote(), logging.getLogger("accelerate.utils.other")
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def save_checkpoint(resume_dir: Path, step: int, accelerator: Accelerator, state: State,
                    best_state: dict[str, torch.Tensor] | None, best_step: int) -> None:
    """Write the checkpoint after optimizer step ``step`` as ``resume_dir/step-N`` and drop the older ones. It is
    written into ``.writing`` and renamed once every process has finished, so a kill mid-write leaves the
    previous checkpoint in force. The engine (model, optimizer, accelerate's own step and generators) goes
    through accelerate's ``save_state`` (under DeepSpeed, DeepSpeed's ``save_checkpoint``: each process writes
    its shard); the loop's ``state`` and every generator, per process, through ``torch.save`` (plain values and
    tensors: read back with ``weights_only=True``); the best weights so far, once, as safetensors."""
    writing, previous = resume_dir / ".writing", latest_checkpoint(resume_dir)
    if accelerator.is_main_process:
        shutil.rmtree(writing, ignore_errors=True)
        writing.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with tied_weights_saved_quietly():
        accelerator.save_state(str(writing / "engine"))
    state = {**state, "format": CHECKPOINT_FORMAT, "step": step, "world": accelerator.num_processes,
             "rng": rng_states()}
    torch.save(state, writing / f"trainer-{accelerator.process_index}.pt")
    if accelerator.is_main_process and best_state is not None:
        name = f"best-step-{best_step}.safetensors"
        if previous is not None and (previous / name).is_file():  # unchanged since the last checkpoint: share it
            try:
                os.link(previous / name, writing / name)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(previous / name, writing / name)
        else:
            save_file({key: tensor.contiguous() for key, tensor in best_state.items()}, str(writing / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        done = resume_dir / f"step-{step:09d}"
        shutil.rmtree(done, ignore_errors=True)
        os.replace(writing, done)
        for older in resume_dir.glob("step-*"):
            if older != done:
                shutil.rmtree(older)
    accelerator.wait_for_everyone()


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes its ZeRO optimizer checkpoints pickle beside tensors and plain values (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 1, 2 and 3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files with ``torch.load(weights_only=True)``: its own reader
    unpickles anything (``weights_only=False``), and a pickle can run code. Its engine reads every file of a
    checkpoint through ``checkpoint_engine.load``, which this replaces on the instance."""
    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def resume_from(checkpoint: Path, accelerator: Accelerator, model: torch.nn.Module,
                scheduler: torch.optim.lr_scheduler.LRScheduler, batches: MicroBatches, lm_order: PromptOrder | None,
                total_steps: int) -> Resumed:
    """Load ``checkpoint`` into the engine (``model``, as prepared) and the loop's parts, the process-wide generators
    last (nothing that loads may draw from them afterwards)."""
    own = checkpoint / f"trainer-{accelerator.process_index}.pt"
    state = torch.load(own, weights_only=True) if own.is_file() else {}
    written_by = (state.get("format"), state.get("world"), state.get("total_steps"))
    if written_by != (CHECKPOINT_FORMAT, accelerator.num_processes, total_steps):
        raise KdbenchError(
            f"the resume checkpoint {checkpoint} was written by a run of (format, processes, optimizer steps) = "
            f"{written_by}, and this run is {(CHECKPOINT_FORMAT, accelerator.num_processes, total_steps)}; run with "
            f"as many processes as before, or delete {checkpoint.parent} to train the stage from the start.")
    if hasattr(model, "checkpoint_engine"):  # a DeepSpeed engine
        load_weights_only(model)
    try:
        accelerator.load_state(str(checkpoint / "engine"))
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL [\w.]+", str(error))
        raise KdbenchError(
            f"the resume checkpoint {checkpoint} holds {unsafe.group(0) if unsafe else 'an object'}, which kdbench does "
            "not unpickle (it reads back tensors, plain values and known DeepSpeed classes only). Delete "
            f"{checkpoint.parent} to train the stage from the start.") from None
    scheduler.load_state_dict(state["scheduler"])  # its step count; the optimizer's state holds the current lr
    batches.load_state_dict(state["batches"])
    if lm_order is not None:
        lm_order.load_state_dict(state["lm_order"])
    best = next(checkpoint.glob("best-step-*.safetensors"), None)
    set_rng_states(state["rng"])  # accelerate's load_state does too, but passes over a file it cannot read silently
    return Resumed(state["step"], TrainStats(**state["stats"]), state["best_value"],
                   None if best is None else load_file(str(best)))
