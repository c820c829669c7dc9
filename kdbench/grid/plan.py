"""``kdbench run --dry-run``: the stage graph rendered, with optimizer steps and memory per GPU.

The plan is the graph ``collect`` built — the very nodes and keys a run executes — annotated with
estimates from settings alone (``kdbench.grid.estimate``): nothing is loaded, trained or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from kdbench.config import Experiment
from kdbench.errors import KdbenchError
from kdbench.grid.context import FROZEN_ROLES
from kdbench.grid.estimate import (
    EVAL_BYTES_PER_CELL,
    EVAL_BYTES_PER_GENERATION,
    DiskEstimate,
    MemoryEstimate,
    ModelSize,
    SplitSizes,
    dataset_sizes,
    estimate_activations,
    estimate_memory,
    teacher_outputs_disk,
    tokens_disk,
    trained_model_disk,
)
from kdbench.grid.graph import Node, StageGraph, StageKind
from kdbench.grid.selection import Selection
from kdbench.grid.specs import CheckpointSpec, InitSpec, TrainSpec
from kdbench.grid.timing import CPU, DeviceSpeed, StageWork, stage_seconds
from kdbench.registry import Registries
from kdbench.report.card import protocol_card
from kdbench.train.engine import total_optimizer_steps


@dataclass(frozen=True)
class TrainingPlan:
    """One training stage: what is trained, how, for how long, and its memory per GPU."""

    model: str
    params: int | None
    objective: str
    engine: str
    precision: str
    zero_stage: int | None  # None: the plain accelerate engine (DDP, no ZeRO)
    gpus: int
    batch_size: int
    grad_accum: int
    steps: int | None  # None: unknown (no data size and no max_steps)
    steps_estimated: bool
    sequences: int  # sequences per prompt run with gradients in one micro-batch
    teacher_params: int  # frozen models resident on the GPU meanwhile (the teacher); 0 when none
    memory: MemoryEstimate | None  # None: model size unknown

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.gpus

    def describe(self) -> dict[str, Any]:
        memory = None if self.memory is None else {
            "weights": self.memory.weights, "gradients": self.memory.gradients, "optimizer": self.memory.optimizer,
            "teacher": self.memory.teacher, "activations": self.memory.activations, "total": self.memory.total}
        return {"model": self.model, "params": self.params, "objective": self.objective, "engine": self.engine,
                "precision": self.precision, "zero_stage": self.zero_stage, "gpus": self.gpus,
                "batch_size": self.batch_size, "grad_accum": self.grad_accum, "global_batch": self.global_batch,
                "steps": self.steps, "steps_estimated": self.steps_estimated, "sequences": self.sequences,
                "resident_params": self.teacher_params, "memory_bytes": memory}


@dataclass(frozen=True)
class PlannedStage:
    """A node of the graph with what running it means."""

    node: Node
    number: int  # position in run order, from 1
    work: str
    training: TrainingPlan | None = None
    seconds: float | None = None  # estimated wall time (kdbench.grid.timing); None: its size is unknown
    cached: bool = False  # its entry is in the cache: a run reuses it
    disk: DiskEstimate | None = None  # what it writes (the cache's entry, or the cell's folder); None: unknown

    @property
    def name(self) -> str:
        """The kind, and for training the objective: "train sft", "train kd"."""
        if self.node.kind is StageKind.TRAIN:
            return f"train {self.node.inputs['objective']['name']}"
        return self.node.kind.value


@dataclass(frozen=True)
class PlannedModel:
    """A teacher or student the family's cells start from, with its size when known."""

    family: str
    role: str  # teacher or student
    label: str
    checkpoint: str  # hub name, local path, or the tiny architecture
    key: str  # its node in the graph
    size: ModelSize | None
    problem: str = ""  # why the size is unknown


@dataclass(frozen=True)
class Plan:
    """What ``kdbench run`` would do: the graph in run order, with example counts before the
    prompt-length filter (None: unknown), model sizes, training steps and memory."""

    experiment: str
    scale: str
    gpus: int
    dataset: str
    train_examples: int | None
    eval_examples: int | None
    data: SplitSizes
    eval_seeds: list[str]
    graph: StageGraph
    models: list[PlannedModel]
    stages: list[PlannedStage]
    card: dict[str, str]  # the protocol card the leaderboard will print
    device: DeviceSpeed  # what the time estimates are for
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """Estimated wall time of the stages a run would build, one after another (None: some size unknown)."""
        times = [stage.seconds for stage in self.stages if not stage.cached]
        return None if None in times else sum(s or 0.0 for s in times)

    def disk_bytes(self, cells: bool) -> int | None:
        """Bytes the stages a run would build write into the results folder (``cells``) or the cache: what they keep,
        plus the largest transient need of one of them (None: some size unknown)."""
        stages = [s for s in self.stages if not s.cached and (s.node.kind is StageKind.EVAL) == cells]
        if any(s.disk is None for s in stages):
            return None
        disks = [s.disk for s in stages if s.disk is not None]
        return sum(d.kept for d in disks) + max((d.transient for d in disks), default=0)

    def longest_stage(self) -> PlannedStage | None:
        timed = [stage for stage in self.stages if stage.seconds is not None and not stage.cached]
        return max(timed, key=lambda stage: stage.seconds or 0.0, default=None)

    @property
    def training_stages(self) -> list[PlannedStage]:
        return [stage for stage in self.stages if stage.training is not None]

    def stage(self, key: str) -> PlannedStage:
        return next(stage for stage in self.stages if stage.node.key == key)

    def cell_steps(self, cell: Node) -> tuple[int | None, int | None]:
        """Optimizer steps of the cell's own training stage, and with every training stage before it (None: unknown)."""
        planned = {stage.node.key: stage.training.steps for stage in self.training_stages if stage.training}
        own_key = cell.deps["model"]
        steps: list[int | None] = []
        for key in self.graph.costed_lineage(own_key):  # as the result counts its ancestors
            if key in planned:
                steps.append(planned[key])
            elif self.graph[key].kind is StageKind.CHECKPOINT:  # a shipped tiny teacher made by kdbench
                recorded = self.graph[key].spec.recorded_training()
                steps.append(0 if recorded is None else recorded["steps"])
        own = planned.get(own_key, 0)
        return own, None if None in steps else sum(s or 0 for s in steps)

    def to_json(self) -> dict[str, Any]:
        """What ``kdbench run --dry-run --format json`` prints."""
        stages = [{**s.node.describe(), "number": s.number, "name": s.name, "work": s.work,
                   "training": None if s.training is None else s.training.describe(),
                   "estimated_seconds": s.seconds, "cached": s.cached,
                   "disk_bytes": None if s.disk is None else {"kept": s.disk.kept, "transient": s.disk.transient}}
                  for s in self.stages]
        models = [{"family": m.family, "role": m.role, "label": m.label, "checkpoint": m.checkpoint, "key": m.key,
                   "params": None if m.size is None else m.size.params, "size_from": None if m.size is None else m.size.source}
                  for m in self.models]
        cells = [{"label": node.label, "key": node.key, "lineage": self.graph.lineage(node.key),
                  **dict(zip(("optimizer_steps", "optimizer_steps_total"), self.cell_steps(node)))}
                 for node in self.graph.cells()]
        return {"experiment": self.experiment, "scale": self.scale, "protocol_card": self.card, "gpus": self.gpus,
                "dataset": self.dataset,
                "train_examples": self.train_examples, "eval_examples": self.eval_examples,
                "data_estimated": self.data.estimated, "eval_seeds": self.eval_seeds, "models": models,
                "stages": stages, "cells": cells, "notes": self.notes,
                "estimate": {"seconds": self.seconds, "device": self.device.kind, "source": self.device.source,
                             "disk_bytes": {"out": self.disk_bytes(cells=True), "cache": self.disk_bytes(cells=False)}}}


class _Planner:
    """Annotates the nodes of one graph; one instance per ``build_plan`` call."""

    def __init__(self, experiment: Experiment, registries: Registries, selection: Selection, graph: StageGraph,
                 gpus: int, device: DeviceSpeed) -> None:
        self.experiment, self.registries, self.selection, self.graph, self.gpus, self.device = (
            experiment, registries, selection, graph, gpus, device)
        self.notes: list[str] = []
        self.data = dataset_sizes(registries.datasets.get(experiment.data.dataset), experiment.data.options)
        self.train_examples = self.data.get("train")
        self.eval_examples = self._capped(self.data.get(experiment.evaluation.split), experiment.evaluation.max_examples)
        self.validation_examples = self._capped(self.data.get("validation"), experiment.selection.max_examples)
        self.eval_work = self._eval_work()
        self.sizes: dict[str, ModelSize | None] = {}  # starting-model key → size
        self.models = self._models()

    @staticmethod
    def _capped(count: int | None, limit: int | None) -> int | None:
        return min(count, limit) if count is not None and limit else count

    def _eval_work(self) -> str:
        """What evaluating one model does: generations on the evaluation split and extra sets, lm-eval tasks."""
        evaluation, seeds = self.experiment.evaluation, len(self.selection.eval_seeds)

        def generations(label: str, count: int | None, estimated: bool) -> str:
            if count is None:
                return f"{label}: ? examples × {seeds} seeds"
            mark = "≈" if estimated else ""
            return f"{label}: {mark}{count:,} examples × {seeds} seeds = {mark}{count * seeds:,} generations"

        parts = [generations(evaluation.split, self.eval_examples, self.data.estimated)]
        if self.gpus > 1:
            parts[0] += f" (sharded over {self.gpus} GPUs)"
        for label, extra in evaluation.datasets.items():
            sizes = dataset_sizes(self.registries.datasets.get(extra.dataset), extra.options)
            parts.append(generations(label, self._capped(sizes.get(extra.split), extra.max_examples), sizes.estimated))
            if sizes.sizes is None or sizes.estimated:
                self.notes.append(f"evaluation set {label}: {sizes.how}")
            if extra.min_response_tokens:
                self.notes.append(f"evaluation set {label}: counted before dropping responses under "
                                  f"{extra.min_response_tokens} tokens")
        if evaluation.lm_eval.tasks:
            limit = f", at most {evaluation.lm_eval.limit:,} examples each" if evaluation.lm_eval.limit else ""
            parts.append(f"lm-eval: {', '.join(evaluation.lm_eval.tasks)}{limit}")
        return "; ".join(parts)

    # -- models -------------------------------------------------------------------------------
    def _models(self) -> list[PlannedModel]:
        """The starting models of every family, teacher first, with their sizes: one row per model (a tiny
        student initialised once per training seed is one row), every starting node sized."""
        # A pretrained base is a training stage: the model row is the initialisation it was pretrained from.
        teachers = {self.graph.start_of(teacher).key for teacher, _ in self.graph.same_vocabulary}
        starts = dict.fromkeys(self.graph.start_of(key).key for pair in self.graph.same_vocabulary for key in pair)
        models = [self._model(self.graph[key], "teacher" if key in teachers else "student") for key in starts]
        rows = {(m.family, m.role, m.label): m for m in reversed(models)}  # the first of each, in order
        return [m for m in models if rows[m.family, m.role, m.label] is m]

    def _model(self, node: Node, role: str) -> PlannedModel:
        assert node.family is not None
        spec, label = node.spec, node.spec.label
        if isinstance(spec, InitSpec):
            checkpoint = f"width {spec.arch.width}, {spec.arch.layers} layers, {spec.arch.heads} heads"
        else:
            assert isinstance(spec, CheckpointSpec)
            checkpoint = spec.path
        try:
            size = self.sizes[node.key] = spec.size(self.experiment.data)
        except KdbenchError as error:
            self.notes.append(f"{node.family}/{label}: size unknown, {error}")
            self.sizes[node.key] = None
            return PlannedModel(node.family, role, label, checkpoint, node.key, None, str(error))
        return PlannedModel(node.family, role, label, checkpoint, node.key, size)

    def size_of(self, key: str) -> ModelSize | None:
        """The size of the model a node produces: that of the starting model it was trained from."""
        return self.sizes.get(self.graph.start_of(key).key)

    # -- stages -------------------------------------------------------------------------------
    def resident(self) -> list[set[str]]:
        """Per node in run order, the models the executor holds loaded for running while it runs: each from
        its first reader to its last (``kdbench.grid.execute``)."""
        order = list(self.graph.nodes)
        spans: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph):
            for role, parent in node.deps.items():
                if role in FROZEN_ROLES:
                    spans.setdefault(parent, [index, index])[1] = index
        return [{key for key, (first, last) in spans.items() if first <= index <= last} for index in range(len(order))]

    def training(self, node: Node, frozen: set[str]) -> TrainingPlan:
        """How one model is trained, and its memory per GPU (frozen models loaded meanwhile included)."""
        spec: TrainSpec = node.spec
        settings = spec.settings
        if settings.max_steps is not None or self.train_examples is not None:
            steps: int | None = total_optimizer_steps(settings, self.train_examples or 0, self.gpus)
        else:
            steps = None
        estimated = settings.max_steps is None and self.data.estimated
        sequences = len(spec.plan.reads)
        size = self.size_of(node.key)
        frozen_params = sum(s.params for s in (self.size_of(k) for k in frozen) if s is not None)
        deepspeed = settings.engine == "deepspeed"
        memory = None
        if size is not None:
            activations = estimate_activations(size, settings.batch_size, self.experiment.data.max_length,
                                               settings.precision, settings.gradient_checkpointing, sequences,
                                               spec.plan.head_dtype is not None)
            # Plain accelerate mixes precision by autocast: fp32 weights, gradients and Adam state, replicated (DDP).
            # Frozen models are loaded in the shared training precision, whatever a method's own.
            memory = estimate_memory(size.params, settings.precision if deepspeed else "fp32",
                                     settings.zero_stage if deepspeed else 0, self.gpus, frozen_params, activations,
                                     teacher_precision=self.experiment.training.precision)
        return TrainingPlan(node.label, size.params if size else None, spec.objective.name, settings.engine,
                            settings.precision, settings.zero_stage if deepspeed else None, self.gpus,
                            settings.batch_size, settings.grad_accum, steps, estimated, sequences, frozen_params, memory)

    def work(self, node: Node, training: TrainingPlan | None) -> str:
        experiment = self.experiment
        if node.kind is StageKind.CHECKPOINT:
            return f"load {node.spec.path}"
        if node.kind is StageKind.TOKENIZER:
            corpus = f" and the {node.inputs['corpus']['dataset']} corpus" if "corpus" in node.inputs else ""
            return (f"byte-level BPE of {experiment.data.tokenizer_vocab_size:,} tokens on the training split{corpus}, "
                    "plus template pieces")
        if node.kind is StageKind.INIT:
            arch = node.spec.arch
            return f"random init, width {arch.width}, {arch.layers} layers, {arch.heads} heads"
        if node.kind is StageKind.TOKENIZE:
            if "corpus" in node.inputs:
                return (f"pack the {node.inputs['corpus']['dataset']} corpus into {experiment.data.max_length}-token "
                        f"chunks, the last {node.inputs['validation_chunks']} held out")
            source = node.inputs["data"]
            if (source["dataset"], source["options"]) != (experiment.data.dataset, experiment.data.options):
                # the teacher's own instruction set
                sizes = dataset_sizes(self.registries.datasets.get(source["dataset"]), source["options"])
                return f"tokenise the teacher's training split ({sizes.get('train') or '?'} records)"
            return f"tokenise the training split ({self._count(self.train_examples)} records)"
        if node.kind is StageKind.GENERATE:
            return self._generation_work()
        if node.kind is StageKind.TEACHER_OUTPUTS:
            outputs = experiment.teacher_outputs
            kept = ("the exact distribution (vocab × 4 bytes a response token)" if outputs.top_k is None else
                    f"the top {outputs.top_k} tokens and an even tail ({outputs.top_k * 8} bytes a response token)")
            return (f"teacher forward over the training split ({self._count(self.train_examples)} records, batches of "
                    f"{outputs.batch_size}), once for every stage reading it: {kept}")
        if node.kind is StageKind.EVAL:
            return self.eval_work
        assert training is not None
        spec: TrainSpec = node.spec
        settings, select = spec.settings, spec.select
        objective = self.registries.objectives.get(training.objective)
        params = {k: v for k, v in dataclasses.asdict(spec.params).items()
                  if v != getattr(objective.Params(), k)}  # the recipe: what differs from the objective's defaults
        recipe = f"{training.objective}" + (f" {params}" if params else "")
        chosen = (f"best validation {select.metric} every {select.every} steps" if select.keep_best
                  else "final checkpoint")
        lm_term = (f"; + {settings.lm_coef:g} × LM term ({1 - settings.lm_kd_ratio:g}·CE + {settings.lm_kd_ratio:g}·word-KD "
                   f"on lm_data)" if settings.lm_coef > 0 else "")
        return (f"{recipe} from {self.graph[node.deps['init']].label}: {steps_text(training)} optimizer steps, lr "
                f"{settings.lr:g}, betas {tuple(settings.betas)}{lm_term}; {chosen}")

    def _count(self, n: int | None) -> str:
        return "?" if n is None else f"{'≈' if self.data.estimated else ''}{n:,}"

    def _generation_work(self) -> str:
        settings, n = self.experiment.teacher_generations, self.train_examples
        if n is None:
            count = "? prompts"
        else:  # the executor shards the prompts over the processes
            mark = "≈" if self.data.estimated else ""
            share = -(-n // self.gpus)
            count = f"{mark}{n:,} prompts" + (f", {mark}{share:,} per GPU" if self.gpus > 1 else "")
            count += f", in {mark}{-(-share // settings.batch_size):,} batches of {settings.batch_size}"
        return f"one teacher sample per training prompt: {count}, ≤ {settings.max_new_tokens} new tokens each"

    def seconds(self, node: Node, training: TrainingPlan | None) -> float | None:
        if training is not None:
            work = StageWork(training.params, training.teacher_params, training.steps, self.train_examples)
        else:
            model = node.deps.get("model", node.deps.get("teacher"))
            size = None if model is None else self.size_of(model)
            prompts = self.eval_examples if node.kind is StageKind.EVAL else self.train_examples
            work = StageWork(None if size is None else size.params, 0, None, prompts)
        return stage_seconds(node, work, self.experiment, self.device, self.gpus, self.validation_examples,
                             len(self.selection.eval_seeds))

    def disk(self, node: Node, training: TrainingPlan | None) -> DiskEstimate | None:
        length, examples = self.experiment.data.max_length, self.train_examples
        if training is not None:
            return None if training.params is None else trained_model_disk(training.params, training.precision)
        if node.kind is StageKind.EVAL:
            if self.eval_examples is None:
                return None
            generations = self.eval_examples * len(self.selection.eval_seeds)
            return DiskEstimate(EVAL_BYTES_PER_CELL + generations * EVAL_BYTES_PER_GENERATION)
        if node.kind is StageKind.TEACHER_OUTPUTS:
            size = self.size_of(node.deps["teacher"])
            if size is None or examples is None:
                return None
            return teacher_outputs_disk(examples * length, size.vocab, self.experiment.teacher_outputs.top_k)
        if node.kind in (StageKind.TOKENIZE, StageKind.GENERATE):
            return None if examples is None else tokens_disk(examples, length)
        return DiskEstimate(0)  # a tokenizer, a tiny init, a checkpoint that is only read: nothing to speak of

    def stages(self, built: Collection[str]) -> list[PlannedStage]:
        planned = []
        for number, (node, frozen) in enumerate(zip(self.graph, self.resident()), start=1):
            training = self.training(node, frozen) if node.kind is StageKind.TRAIN else None
            planned.append(PlannedStage(node, number, self.work(node, training), training,
                                        self.seconds(node, training), node.key in built, self.disk(node, training)))
        return planned


def build_plan(graph: StageGraph, experiment: Experiment, registries: Registries, selection: Selection,
               gpus: int = 1, device: DeviceSpeed = CPU, built: Collection[str] = ()) -> Plan:
    """``graph`` annotated for ``gpus`` GPUs (processes) of ``device``: model sizes, optimizer steps, memory per GPU
    and wall time; the stages in ``built`` (cached) count no time. Loads no weights and trains nothing."""
    if gpus < 1:
        raise KdbenchError(f"the number of GPUs must be at least 1, got {gpus}.")
    planner = _Planner(experiment, registries, selection, graph, gpus, device)
    stages = planner.stages(built)
    data = planner.data
    notes = [f"training examples: {data.how}"]
    if data.sizes is not None:
        notes.append(f"records are counted before the prompt-length filter (data.max_prompt_length = "
                     f"{experiment.data.max_prompt_length} tokens), so step and example counts are upper bounds")
    if planner.train_examples is not None:
        if any(-(-planner.train_examples // s.training.batch_size) < gpus for s in stages if s.training is not None):
            notes.append(f"{planner.train_examples:,} training examples give some GPU no micro-batch per epoch; "
                         "lower batch_size or the number of GPUs")
    notes += planner.notes
    notes.append("memory: ZeRO model states (Rajbhandari et al. 2020) plus the frozen models loaded meanwhile (the teacher, "
                 "whole on every GPU in the training precision, from its first reader to its last); activations are an "
                 "estimate (Korthikanti et al. 2022) for micro-batch × data.max_length = "
                 f"{experiment.data.max_length} tokens per sequence")
    return Plan(experiment.name, experiment.models.scale, gpus, experiment.data.dataset, planner.train_examples,
                planner.eval_examples, data, list(selection.eval_seeds), graph, planner.models, stages,
                protocol_card(experiment, selection.seeds), device, notes)


def steps_text(plan: TrainingPlan) -> str:
    return "?" if plan.steps is None else f"{'≈' if plan.steps_estimated else ''}{plan.steps:,}"
