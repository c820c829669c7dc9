"""The few collective operations a grid needs beyond training itself.

``accelerate launch`` (or torchrun, or the deepspeed launcher) starts one ``kdbench run`` per device;
every process walks the same grid in the same order. Training is data-parallel inside the engine;
outside it the processes split generation work, and only the main process writes the stage cache
and the results, while the others wait at a barrier and then read what it wrote. The cache and
results folders must therefore be on a filesystem every process sees (one node, or a shared disk).
A plain ``kdbench run`` is a world of one, where every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

BARRIER_TIMEOUT = timedelta(hours=3)
T = TypeVar("T")
R = TypeVar("R")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``); 1 for a plain ``kdbench run``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group() -> None:
    """Join the launcher's process group before the first stage, so the cache and result writes can be
    fenced with barriers. gloo on CPU, nccl on GPUs, through accelerate like the engine."""
    if launched_world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        # The other processes wait at a barrier while the main one alone runs lm-eval or writes a cache
        # entry; the default timeout (10-30 min) could end a healthy paper-scale run.
        PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def destroy_process_group() -> None:
    """Leave the launcher's group once every process is done, so its communication threads are joined
    here rather than torn down mid-flight at interpreter exit (where a process then aborts)."""
    if launched_world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its own GPU (``LOCAL_RANK``) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def map_sharded(items: Sequence[T], fn: Callable[[Sequence[T]], list[R]]) -> list[R]:
    """``fn`` over this process's contiguous share of ``items``, gathered back into the original order
    on every process. With one process it is simply ``fn(items)``."""
    world = world_size()
    if world == 1:
        return fn(items)
    share = -(-len(items) // world)
    mine = fn(items[rank() * share:(rank() + 1) * share])
    return [result for part in gather_objects(mine) for result in part]


def gather_objects(item: T) -> list[T]:
    """``item`` of every process, in rank order, on every process."""
    if world_size() == 1:
        return [item]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def shard_size(n_items: int) -> int:
    """How many of ``n_items`` one process handles in ``map_sharded`` (for progress totals)."""
    return -(-n_items // world_size())
