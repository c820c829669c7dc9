"""One way to prepare and run a grid, shared by ``kdbench run`` and every cluster job: the plugins loaded, the
stage graph collected from the experiment and the selection, then the graph run in this process (or in every
process of a launch) with exactly the experiment's named models allowed to run their own code."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdbench.config import Experiment
    from kdbench.grid.execute import RunSummary
    from kdbench.grid.graph import StageGraph
    from kdbench.grid.plan import Plan
    from kdbench.grid.selection import Selection
    from kdbench.registry import Registries


@dataclass(frozen=True)
class GridRequest:
    """What a run is asked for: the experiment, the selection made from it, where plugins, results and the stage
    cache are. A cluster job gets the ``absolute`` form, since it may start in another folder, on another node."""

    experiment: Experiment
    selection: Selection
    plugins_dir: Path | None
    out_dir: Path
    cache_dir: Path

    def absolute(self) -> GridRequest:
        return GridRequest(self.experiment, self.selection, self.plugins_dir.resolve() if self.plugins_dir else None,
                           self.out_dir.resolve(), self.cache_dir.resolve())


@dataclass(frozen=True)
class PreparedGrid:
    request: GridRequest
    registries: Registries
    graph: StageGraph


def prepare(request: GridRequest, registries: Registries | None = None) -> PreparedGrid:
    """The request's stage graph, collected with ``registries`` (loaded from ``request.plugins_dir`` when None:
    a job in a fresh process loads them as the submitting command did)."""
    from kdbench.grid.collect import collect
    from kdbench.registry import load_registries

    registries = registries if registries is not None else load_registries(request.plugins_dir)
    return PreparedGrid(request, registries, collect(request.experiment, registries, request.selection))


def run_prepared(prepared: PreparedGrid, targets: Collection[str] | None = None) -> RunSummary:
    """Run the graph (only ``targets`` and what they need, when given) after joining the launcher's process group,
    if there is one. The caller leaves the group (``distributed.destroy_process_group``) once it has asked what it
    needs of it, such as whether this is the main process."""
    from kdbench import distributed
    from kdbench.grid.execute import run_graph
    from kdbench.grid.security import remote_code_scope

    request = prepared.request
    distributed.init_process_group(request.experiment.runtime)
    with remote_code_scope(request.experiment, prepared.graph, request.cache_dir):  # the checkpoints it names
        return run_graph(prepared.graph, request.experiment, prepared.registries, request.out_dir, request.cache_dir,
                         targets=None if targets is None else set(targets))


def plan_prepared(prepared: PreparedGrid, gpus: int, gpus_asked: bool) -> Plan:
    """What a run of the prepared grid would do (``kdbench run --dry-run``), its time estimated for this machine's
    GPU, else for the GPUs asked for, else for its CPU (``timing.device_speed``); the stages a run would not build
    (cached, or needed only by finished cells) count no time. Reads the cache and results folder, writes nothing."""
    import torch

    from kdbench.grid.cache import StageCache
    from kdbench.grid.execute import finished_cells, needed_stages
    from kdbench.grid.graph import StageKind
    from kdbench.grid.plan import build_plan
    from kdbench.grid.security import remote_code_scope
    from kdbench.grid.timing import device_speed

    request, graph = prepared.request, prepared.graph
    finished = finished_cells(graph, request.out_dir, tell=False)  # the run itself says why a cell runs again
    needed, cache = needed_stages(graph, graph.cells(), finished), StageCache(request.cache_dir)
    built = {node.key for node in graph if node.key not in needed
             or (node.kind is not StageKind.EVAL and cache.has(node.kind.value, node.key))}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = device_speed(gpu, gpus_asked, request.experiment.models.scale == "paper")
    with remote_code_scope(request.experiment, graph, request.cache_dir):  # the checkpoints named in the experiment
        return build_plan(graph, request.experiment, prepared.registries, request.selection, gpus, device, built)


def check_time_bound(plan: Plan, experiment: Experiment) -> None:
    """Refuse (``KdbenchError``) a grid whose estimated time is beyond ``runtime.max_estimated_days``."""
    from kdbench.errors import KdbenchError
    from kdbench.grid.timing import duration, over_bound

    longest = plan.longest_stage()
    described = "?" if longest is None else f"{longest.name} ({longest.node.label}, {duration(longest.seconds)})"
    problem = over_bound(plan.seconds, experiment.runtime.max_estimated_days, plan.device, described)
    if problem is not None:
        raise KdbenchError(problem)
