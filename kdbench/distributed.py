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

from kdbench.config import RuntimeConfig

T = TypeVar("T")
R = TypeVar("R")
# The group the processes wait on while the main one alone works (``barrier``, ``gather_objects``): gloo, with its own
# timeout, so a long wait for lm-eval or another worker does not need a long timeout on training's collectives.
_waits: Any = None


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``); 1 for a plain ``kdbench run``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(runtime: RuntimeConfig | None = None) -> None:
    """Join the launcher's process group before the first stage (gloo on CPU, nccl on GPUs, through accelerate like
    the engine), its collectives bounded by ``runtime.collective_timeout_seconds``; and a gloo group for waiting on
    the main process, bounded by ``runtime.wait_timeout_seconds``."""
    global _waits
    if launched_world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        runtime = runtime or RuntimeConfig()
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=runtime.collective_timeout_seconds))
        _waits = dist.new_group(backend="gloo", timeout=timedelta(seconds=runtime.wait_timeout_seconds))


def destroy_process_group() -> None:
    """Leave the launcher's group once every process is done, so its communication threads are joined
    here rather than torn down mid-flight at interpreter exit (where a process then aborts)."""
    global _waits
    if launched_world_size() > 1 and dist.is_initialized():
        dist.barrier(group=_waits)
        dist.destroy_process_group()
        _waits = None


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
    """Wait until every process gets here (on the waiting group: the others may wait long for the main one)."""
    if world_size() > 1:
        dist.barrier(group=_waits)


def map_sharded(items: Sequence[T], fn: Callable[[Sequence[T]], list[R]]) -> list[R]:
    """``fn`` over this process's contiguous share of ``items``, gathered back into the original order
    on every process. With one process it is simply ``fn(items)``."""
    world = world_size()
    if world == 1:
        return fn(items)
    share = -(-len(items) // world)
    mine = fn(items[rank() * share:(rank() + 1) * share])
    # on the launch's group: a process that failed on its share is waited for only as long as any collective
    return [result for part in gather_objects(mine, waiting=False) for result in part]


def gather_objects(item: T, waiting: bool = True) -> list[T]:
    """``item`` of every process, in rank order, on every process; on the waiting group unless ``waiting`` is
    False (then bounded by ``runtime.collective_timeout_seconds``)."""
    if world_size() == 1:
        return [item]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, item, group=_waits if waiting else None)
    return gathered


def shard_size(n_items: int) -> int:
    """How many of ``n_items`` one process handles in ``map_sharded`` (for progress totals)."""
    return -(-n_items // world_size())
