"""Running a stage graph: resume, failure isolation, and the in-process executor.

The in-process executor walks the graph in order on every process of a launch (one process, or all of
those ``accelerate launch`` / the deepspeed launcher started): cells whose result holds their key and
status ``ok`` are finished and skipped with everything only they needed; a stage whose entry is in the
cache is reused; the rest is built. Workers sharing a grid (two ``kdbench run``s on one results folder and
cache) do not queue behind each other: a stage or cell another worker is making now is passed over, with
what depends on it, and taken up on a later pass, when it is most likely published; a worker waits for
another only when nothing else is left to do. A stage that raises, or whose loss becomes non-finite, marks the
cells downstream of it ``failed`` or ``diverged`` (with the stage, the step and the reason) and every
other cell still runs. A mistake the user can fix (``KdbenchError``) or Ctrl-C stops the run instead.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kdbench import distributed
from kdbench.config import Experiment
from kdbench.errors import KdbenchError
from kdbench.grid.cache import StageCache, claim
from kdbench.grid.context import FROZEN_ROLES, STATS_FILES, RunContext
from kdbench.grid.graph import Node, StageGraph, StageKind
from kdbench.grid.stages import BUILDERS, discard_resume_checkpoint, failure_of, write_unscored_cell
from kdbench.registry import Registries
from kdbench.results import store
from kdbench.results.schema import CellResult, Failure, Status
from kdbench.runtime import say
from kdbench.runtime.watchdog import watch
from kdbench.zoo import check_same_vocab_size, check_same_vocabulary, config_vocab_size, load_tokenizer


@dataclass
class RunSummary:
    """What a run left: the result of every cell of the graph (from this run or an earlier one)."""

    results: dict[str, CellResult] = field(default_factory=dict)  # cell label → result
    unrecorded: list[str] = field(default_factory=list)  # cells whose result, even a failure, could not be written

    @property
    def unscored(self) -> list[CellResult]:
        return [result for result in self.results.values() if result["status"] != "ok"]


def cell_folder(out_dir: Path, node: Node) -> Path:
    cell = node.spec
    return store.cell_dir(out_dir, cell.family, cell.student, cell.method, cell.seed)


def finished_cells(graph: StageGraph, out_dir: Path, tell: bool = True) -> dict[str, CellResult]:
    """Cells an earlier run scored with exactly this key, by key; says why (with ``tell``) of each cell whose files
    are there but cannot be read as a report reads them (it is run again)."""
    found = {}
    for node in graph.cells():
        note = partial(_running_again, node.label) if tell and distributed.is_main() else None
        result = store.finished_result(cell_folder(out_dir, node), node.key, note)
        if result is not None:
            found[node.key] = result
    return found


def _running_again(label: str, problem: str) -> None:
    say(f"{label}: running it again, since its results cannot be read: {problem}")


def needed_stages(graph: StageGraph, wanted: list[Node], finished: Collection[str]) -> set[str]:
    """The keys of every stage the cells of ``wanted`` not in ``finished`` are built from, themselves included."""
    return {key for node in wanted if node.key not in finished for key in graph.lineage(node.key)}


def unbuilt_stages(graph: StageGraph, out_dir: Path, cache_dir: Path) -> list[Node]:
    """The stages a run of ``graph`` into ``out_dir`` would build in the cache (in run order): those its unfinished
    cells need that are not published there. None means the run only reads the cache."""
    needed, cache = needed_stages(graph, graph.cells(), finished_cells(graph, out_dir)), StageCache(cache_dir)
    return [node for node in graph if node.key in needed and node.kind not in (StageKind.CHECKPOINT, StageKind.EVAL)
            and not cache.has(node.kind.value, node.key)]


def claim_cell(folder: Path, node: Node) -> AbstractContextManager[bool]:
    """Whether this run must write the cell (``kdbench.grid.cache.claim``): False once any worker has scored it
    with this key. Two runs on one results folder so evaluate each cell once."""
    return claim(store.cell_lock(folder), lambda: store.finished_result(folder, node.key) is not None,
                 f"cell {node.label}")


def check_vocabularies(graph: StageGraph, needed: set[str]) -> None:
    """Teacher and student checkpoints of a family must share a vocabulary (tokenizers) and a logit width (their
    configs' ``vocab_size``): checked before anything trains. Tiny models built from one tokenizer agree by
    construction; a tiny student built from a shipped teacher's tokenizer is checked against that teacher."""
    for teacher, student in graph.same_vocabulary:
        if student not in needed:
            continue
        # a base pretrained here is built from the initialisation it starts from
        nodes = graph.start_of(teacher), graph.start_of(student)
        if nodes[0].kind is not StageKind.CHECKPOINT:
            continue
        path = nodes[0].spec.path
        if nodes[1].kind is StageKind.CHECKPOINT:
            paths = [path, nodes[1].spec.path]
            check_same_vocabulary(load_tokenizer(paths[0]), load_tokenizer(paths[1]), *paths)
            check_same_vocab_size(config_vocab_size(paths[0]), config_vocab_size(paths[1]), *paths)
        else:  # the family builds the student from the teacher's tokenizer, as build_init does
            spec, tokenizer = nodes[1].spec, load_tokenizer(path)
            built = spec.family.make_config(spec.arch, len(tokenizer), 8, tokenizer.eos_token_id, tokenizer.pad_token_id)
            check_same_vocab_size(config_vocab_size(path), int(built.vocab_size), path, nodes[1].label)


def made_elsewhere_now(node: Node, context: RunContext) -> bool:
    """Whether another worker holds the lock of ``node`` now: it is building that stage or scoring that cell.
    Every process of a launch gets the main process's answer, so they all pass over the same nodes."""
    if node.kind is StageKind.CHECKPOINT:
        return False
    lock = (store.cell_lock(cell_folder(context.out_dir, node)) if node.kind is StageKind.EVAL
            else context.cache.lock_path(node.kind.value, node.key))
    return distributed.gather_objects(distributed.is_main() and store.lock_is_held(lock))[0]


def run_sharing(nodes: list[Node], run_node: Callable[[Node], None], context: RunContext) -> None:
    """Run ``nodes`` (in graph order) with ``run_node``, passing over what another worker is making now (and what
    depends on it) until a later pass; when every node left is passed over, wait for the first, as run_stage does."""
    pending = nodes
    while pending:
        passed_over: set[str] = set()
        for node in pending:
            if any(parent in passed_over for parent in node.deps.values()) or made_elsewhere_now(node, context):
                passed_over.add(node.key)
            else:
                run_node(node)
        if len(passed_over) == len(pending):
            run_node(pending[0])
            passed_over.discard(pending[0].key)
        pending = [node for node in pending if node.key in passed_over]


def watched(node: Node, context: RunContext) -> AbstractContextManager[None]:
    """``node``'s stage under the experiment's watchdog (``runtime``), its reports in this process's log."""
    runtime = context.experiment.runtime
    return watch(f"{node.label}: {node.kind.value}", runtime.stall_seconds, runtime.on_stall, context.log, say)


def run_stage(node: Node, context: RunContext) -> None:
    """Build (or reuse) one stage and record its output in ``context``."""
    builder = BUILDERS[node.kind]
    if node.kind is StageKind.CHECKPOINT:
        context.outputs[node.key] = node.spec.path
        recorded = node.spec.recorded_training()  # a shipped tiny teacher: its training counts
        if recorded is not None:
            context.train_stats[node.key] = {**recorded, "this_run": 0.0}
        return
    if node.kind is StageKind.EVAL:
        folder = cell_folder(context.out_dir, node)
        with claim_cell(folder, node) as evaluate:  # not when another worker has just scored it
            if evaluate:
                builder.build(node, context, folder)
        return
    stage = f"{node.label}: {node.kind.value}"
    context.hook.kdbench_on_stage_start(stage=stage, total=None)
    started = time.perf_counter()
    path, cached = context.cache.get_or_build(node.kind.value, node.key, node.describe(),
                                              lambda folder: builder.build(node, context, folder), builder.collective)
    seconds = time.perf_counter() - started
    context.hook.kdbench_on_stage_end(stage=stage, seconds=seconds, cached=cached)
    context.outputs[node.key] = str(path)
    if node.kind is StageKind.TRAIN:
        discard_resume_checkpoint(context, node)
    if node.kind in STATS_FILES:
        stats = context.read_json(node.key, STATS_FILES[node.kind])
        context.train_stats[node.key] = {**stats, "this_run": 0.0 if cached else seconds}


def agree(failure: tuple[Status, Failure] | None) -> tuple[tuple[Status, Failure] | None, bool]:
    """Every process of a launch takes the same view of a stage: failed if it failed anywhere; and whether the
    launch can go on. A non-finite loss is seen by every process at once (it is reduced over them), so all fail
    alike and their collectives stay in step. A stage that failed on some processes but not others, or differently
    (one raised while the others waited in a collective operation until ``runtime.collective_timeout_seconds``),
    leaves the launch's collectives out of step or its connections closed, and nothing more can be trained."""
    if distributed.world_size() == 1:
        return failure, True
    seen: list[Any] = distributed.gather_objects(failure)
    first = next((f for f in seen if f is not None), None)
    if all(f == first for f in seen):
        return first, True
    assert first is not None
    status, details = first  # the reason names each process's own failure: which one is the cause is not known
    reasons = "; ".join(f"process {rank}: {f[1]['reason'] if f else 'no failure'}" for rank, f in enumerate(seen))
    return (status, {**details, "reason": reasons[:2000]}), False


def run_graph(graph: StageGraph, experiment: Experiment, registries: Registries, out_dir: Path,
              cache_dir: Path, targets: Collection[str] | None = None) -> RunSummary:
    """Run every stage the unfinished cells of ``graph`` need, in graph order, on this process. ``targets`` (node
    keys, cells or other stages) narrows that to those nodes and what they need: one cluster job's share of the
    grid (``kdbench.grid.cluster``)."""
    started = time.perf_counter()
    context = RunContext(graph, experiment, registries, out_dir, cache_dir)
    summary = RunSummary()
    finished = finished_cells(graph, out_dir)
    wanted = graph.cells() if targets is None else [node for node in graph if node.key in targets]
    to_run = [node for node in wanted if node.key not in finished]
    needed = needed_stages(graph, wanted, finished)
    check_vocabularies(graph, needed)
    context.hook.kdbench_on_run_start(plan={
        "experiment": experiment.name, "out_dir": str(out_dir), "cells": [n.label for n in wanted if n.kind is StageKind.EVAL],
        "to_run": [n.label for n in to_run if n.kind is StageKind.EVAL], "stages": len(graph)})
    for node in wanted:
        if node.key in finished:
            summary.results[node.label] = finished[node.key]
    # A model a stage only runs (the teacher, a model under evaluation) stays loaded until its last reader.
    readers = Counter(parent for node in graph if node.key in needed
                      for role, parent in node.deps.items() if role in FROZEN_ROLES)
    failures: dict[str, tuple[Status, Failure]] = {}
    stopped: list[str] = []  # the stage after whose failure the processes of this launch cannot work together

    def run_node(node: Node) -> None:
        upstream = next((failures[parent] for parent in node.deps.values() if parent in failures), None)
        if upstream is not None:  # skipped: an ancestor failed, and the cell reports that ancestor
            failures[node.key] = upstream
        elif stopped:
            return  # left unfinished, for the next run
        else:
            failure = None
            try:
                with watched(node, context):
                    run_stage(node, context)
            except (KdbenchError, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001  (isolated: reported in the result, the grid goes on)
                failure = failure_of(node, error)
            failure, in_step = agree(failure)
            if failure is not None:
                failures[node.key] = failure
            if not in_step:
                stopped.append(f"{node.label}: {node.kind.value}")
        if node.kind is StageKind.EVAL:
            try:
                if node.key in failures:
                    status, reason = failures[node.key]
                    with claim_cell(cell_folder(out_dir, node), node) as unscored:  # never over another worker's score
                        if unscored:
                            write_unscored_cell(context, node, status, reason)
                summary.results[node.label] = json.loads((cell_folder(out_dir, node) / "result.json").read_text())
            except OSError as error:  # a full disk, say: the cell stays unfinished and the grid goes on
                summary.unrecorded.append(node.label)
                say(f"{node.label}: its result could not be written ({error}); it stays unfinished.")
        for role, parent in node.deps.items():
            if role in FROZEN_ROLES:
                readers[parent] -= 1
                if readers[parent] == 0:
                    context.release(parent)

    run_sharing([node for node in graph if node.key in needed], run_node, context)
    if stopped:
        raise KdbenchError(
            f"stage {stopped[0]} failed on some processes of this launch and not on others (see each process's "
            "error above), so their collective operations are out of step and the launch stops here. The cells that "
            f"need that stage are marked failed in {out_dir}; run the same command again to go on with the rest "
            "(finished cells are kept).")
    context.hook.kdbench_on_run_end(out_dir=str(out_dir), seconds=time.perf_counter() - started)
    return summary


def build_stages(graph: StageGraph, keys: list[str], experiment: Experiment, registries: Registries,
                 cache_dir: Path) -> dict[str, str]:
    """Build (or reuse from the cache) the stages ``keys`` and everything they need, in graph order, with no
    cell around them (``kdbench export-teachers``); returns each key's output folder."""
    context = RunContext(graph, experiment, registries, Path("."), cache_dir, log_dir=cache_dir / "logs")
    needed = {key for target in keys for key in graph.lineage(target)}
    check_vocabularies(graph, needed)

    def run_node(node: Node) -> None:
        with watched(node, context):
            run_stage(node, context)

    run_sharing([node for node in graph if node.key in needed], run_node, context)
    return {key: context.outputs[key] for key in keys}
