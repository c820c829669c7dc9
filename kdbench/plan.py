"""``kdbench run --dry-run``: the stages a run would go through, and a per-GPU memory estimate.

Nothing here loads weights or tokenizers, trains or generates. Model sizes come from configs alone:
a local model folder's ``config.json``, a hub checkpoint's config when it is in the local Hugging Face
cache, else the family's built-in table of paper checkpoints (``ModelFamily.paper_configs``), and at
tiny scale the family's ``make_config``. Every config is turned into a model on the meta device
(no memory) and its parameters are counted. Data sizes come from the dataset's registry entry: its
``load`` when that works offline, else the sizes it documents (marked as estimates).

The stages are listed in the order ``kdbench.runner.Runner.run_family`` runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kdbench.config import DataConfig, Experiment, TrainingConfig
from kdbench.data import TEMPLATE_PIECES, DatasetSpec
from kdbench.engine import total_optimizer_steps
from kdbench.errors import KdbenchError
from kdbench.objectives import Need, Objective, ObjectiveParams
from kdbench.registry import Registries
from kdbench.runner import TEACHER_METHOD, Selection, method_params
from kdbench.zoo import ModelFamily, TinyArch

GIB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Bytes per parameter of (weights, gradients, Adam optimizer state): ZeRO's 2Ψ + 2Ψ + KΨ with K = 12 in
# mixed precision (fp32 master weights + two fp32 moments); in fp32 the weights are their own master copy.
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# The ids train_tokenizer gives its special tokens (EOS first, PAD second); they do not change any size.
TINY_EOS_ID, TINY_PAD_ID = 0, 1


# -- model sizes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """A model's parameter count and the shape numbers the activation estimate needs."""

    params: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    source: str  # where the config came from: local folder, HF cache, built-in table, tiny architecture


def count_config_parameters(config: PretrainedConfig) -> int:
    """Parameters of the causal LM ``config`` describes, built on the meta device (no memory, no weights);
    tied input/output embeddings count once, as the checkpoint stores them."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    # Under init_empty_weights, transformers 5 leaves lm_head with a meta tensor of its own; tying again
    # makes it the embedding's Parameter, so parameters() (which skips repeats) counts it once.
    model.tie_weights()
    return sum(parameter.numel() for parameter in model.parameters())


def size_of_config(config: PretrainedConfig, source: str) -> ModelSize:
    """The ``ModelSize`` of ``config``; hidden/layers/heads/vocab through the config's standard aliases."""
    text = config.get_text_config()
    return ModelSize(count_config_parameters(config), int(text.hidden_size), int(text.num_hidden_layers),
                     int(text.num_attention_heads), int(text.vocab_size), source)


def paper_model_size(name_or_path: str, family: ModelFamily) -> ModelSize:
    """The size of a paper-scale checkpoint, without touching the network or any weights: a local model
    folder's config, else the hub config if it is in the local HF cache, else ``family.paper_configs``."""
    if Path(name_or_path).is_dir():  # from_pretrained would take the folder too, so the plan does the same
        try:
            return size_of_config(AutoConfig.from_pretrained(name_or_path), "local folder")
        except (OSError, ValueError) as error:
            raise KdbenchError(f"{name_or_path} is a folder but holds no readable model config: {error}") from None
    try:
        return size_of_config(AutoConfig.from_pretrained(name_or_path, local_files_only=True), "HF cache")
    except (OSError, ValueError):
        pass  # not cached here: the built-in table below
    fields = dict(family.paper_configs.get(name_or_path) or {})
    if not fields:
        raise KdbenchError(f"no config for {name_or_path!r}: it is not a local folder, not in the HF cache and not in "
                           f"the {family.name} family's table ({sorted(family.paper_configs) or 'empty'}).")
    return size_of_config(AutoConfig.for_model(fields.pop("model_type"), **fields), "built-in table")


def tiny_model_size(family: ModelFamily, arch: TinyArch, data: DataConfig) -> ModelSize:
    """The size of a tiny model as the runner builds it: the family's config class, the BPE vocabulary plus
    one added token per constant template piece, and ``max_length`` positions."""
    vocab = data.tokenizer_vocab_size + len(TEMPLATE_PIECES)
    config = family.make_config(arch, vocab, data.max_length, TINY_EOS_ID, TINY_PAD_ID)
    return size_of_config(config, "tiny architecture")


# -- memory ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU while training one model."""

    weights: int
    gradients: int
    optimizer: int
    teacher: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations


def _shard(nbytes: int, gpus: int, sharded: bool) -> int:
    return -(-nbytes // gpus) if sharded else nbytes  # ceil: the largest shard


def estimate_memory(params: int, precision: str, zero_stage: int, gpus: int, teacher_params: int = 0,
                    activations: int = 0, teacher_precision: str | None = None) -> MemoryEstimate:
    """Per-GPU memory of training ``params`` parameters with Adam, after ZeRO (Rajbhandari et al. 2020,
    "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", §3 and Fig. 1).

    With Ψ = ``params`` and N = ``gpus``:

    * bf16 / fp16 (mixed precision): weights 2Ψ, gradients 2Ψ, optimizer state 12Ψ (an fp32 master copy
      of the weights and Adam's two fp32 moments, 4Ψ each);
    * fp32: weights 4Ψ, gradients 4Ψ, optimizer state 8Ψ (the two moments).

    ZeRO stage 0 replicates all three on every GPU; stage 1 divides the optimizer state by N, stage 2 also
    the gradients, stage 3 also the weights. A frozen teacher adds its weights only, whole on every GPU,
    in ``teacher_precision`` (default: ``precision``): 2Ψ_T or 4Ψ_T. ``activations`` (bytes, see
    ``estimate_activations``) is added as given. Not counted: DeepSpeed's communication buckets, the CUDA
    context, allocator fragmentation and temporary buffers.
    """
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {sorted(STATE_BYTES)}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    weight_bytes, gradient_bytes, optimizer_bytes = STATE_BYTES[precision]
    return MemoryEstimate(
        weights=_shard(weight_bytes * params, gpus, zero_stage >= 3),
        gradients=_shard(gradient_bytes * params, gpus, zero_stage >= 2),
        optimizer=_shard(optimizer_bytes * params, gpus, zero_stage >= 1),
        teacher=PRECISION_BYTES[teacher_precision or precision] * teacher_params,
        activations=activations,
    )


def estimate_activations(size: ModelSize, batch_size: int, seq_len: int, precision: str,
                         checkpointing: bool = False, sequences: int = 1) -> int:
    """An *estimate* of the activation bytes one GPU keeps for backward over a micro-batch of ``batch_size``
    sequences of ``seq_len`` tokens, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", §4), with s = ``seq_len``, b = ``batch_size``, h, a, L, v the model's width,
    heads, layers and vocabulary:

    * per layer, 16-bit, no recomputation: s·b·h·(34 + 5·a·s/h) bytes (attention scores included, as
      without flash attention); with gradient checkpointing only each layer's input, 2·s·b·h;
    * the output layer (their §4.3): final layer norm and vocabulary projection input, 2·s·b·h each, and
      the fp32 logits of the loss, 4·s·b·v;
    * fp32 training doubles the 16-bit terms (approximation: the 1-byte dropout masks do not double);
    * times ``sequences``: the sequences per prompt the student runs with gradients in one micro-batch
      (gold, plus teacher text, a fresh sample or a rollout), all kept until the one backward pass.

    Every sequence is taken at full length; padding to the batch's longest makes that an upper bound per
    batch. Not counted: the transient recomputation of one layer in backward, the teacher's logits, the
    objective's extra fp32 (b, s, v) tensors, and the KV cache of sampling.
    """
    s, b, h, a, v = seq_len, batch_size, size.hidden, size.heads, size.vocab
    scale = PRECISION_BYTES[precision] // 2  # 1 for 16-bit, 2 for fp32
    per_layer = 2 * s * b * h if checkpointing else 34 * s * b * h + 5 * a * s * s * b  # = s·b·h·(34 + 5as/h)
    output_layer = 4 * s * b * h * scale + 4 * s * b * v
    return sequences * (size.layers * per_layer * scale + output_layer)


# -- data -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitSizes:
    """Records per split of a dataset as planned with, and how they were found."""

    sizes: dict[str, int] | None  # None: unknown
    estimated: bool  # documented sizes, not counted
    how: str

    def get(self, split: str) -> int | None:
        return None if self.sizes is None else self.sizes.get(split)


def dataset_sizes(spec: DatasetSpec, options: dict[str, Any]) -> SplitSizes:
    """Count the records of every split through the registry's ``load``; when that cannot run (data not
    available offline), fall back to the sizes the dataset documents."""
    try:
        splits = spec.load(dict(options))
    except KdbenchError as error:
        if spec.documented_sizes is None:
            return SplitSizes(None, False, f"unknown: {spec.name} could not be loaded and documents no sizes ({error})")
        return SplitSizes(dict(spec.documented_sizes(dict(options))), True,
                          f"documented sizes of {spec.name} (estimate; it could not be loaded: {error})")
    return SplitSizes({name: len(records) for name, records in splits.items()}, False, f"counted from {spec.name}")


# -- the plan -------------------------------------------------------------------------------------

class StageKind(str, Enum):
    """The runner's stages, as the plan lists them."""

    TOKENIZER = "tokenizer"
    INIT = "init"
    TEACHER_SFT = "teacher sft"
    GENERATIONS = "teacher generations"
    SFT_INIT = "sft init"
    TRAIN = "train"
    EVAL = "eval"


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
    teacher_params: int  # 0 when the teacher is not on the GPU
    memory: MemoryEstimate | None  # None: model size unknown

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.gpus


@dataclass(frozen=True)
class Stage:
    """One stage in run order. ``reused`` stages are cache hits of a stage listed earlier."""

    kind: StageKind
    name: str  # the cell or model the stage serves, e.g. gpt2/120M/kd/seed0
    work: str
    training: TrainingPlan | None = None
    reused: bool = False


@dataclass(frozen=True)
class PlannedModel:
    """A teacher or student the family's cells start from, with its size when known."""

    family: str
    role: str  # teacher or student
    label: str
    checkpoint: str  # hub name, local path, or the tiny architecture
    size: ModelSize | None
    problem: str = ""  # why the size is unknown

    @property
    def key(self) -> str:
        """What the stage cache knows this starting model by: tiny models of two families differ."""
        return f"{self.family}:{self.checkpoint}"


@dataclass(frozen=True)
class FamilyPlan:
    """One family's models and its stages in run order."""

    family: str
    models: list[PlannedModel]
    stages: list[Stage]


@dataclass(frozen=True)
class Plan:
    """What ``kdbench run`` would do: per family, its stages in order; example counts before the
    prompt-length filter (None: unknown)."""

    experiment: str
    scale: str
    gpus: int
    dataset: str
    train_examples: int | None
    eval_examples: int | None
    data: SplitSizes
    eval_seeds: list[str]
    families: list[FamilyPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def training_stages(self) -> list[Stage]:
        return [stage for family in self.families for stage in family.stages if stage.training is not None]


def student_sequences(objective: type[Objective], params: ObjectiveParams) -> int:
    """Sequences per prompt the student runs forward with gradients in one micro-batch, as the engine's
    ``batch_loss_sums`` does: the gold one, plus the stored teacher text, a fresh student sample, a rollout."""
    if params.kd_ratio == 0:
        return 1  # only gold cross-entropy is computed
    needs = objective.needs_for(params)
    return 1 + sum(need in needs for need in (Need.TEACHER_GENERATIONS, Need.STUDENT_SAMPLES, Need.ROLLOUTS))


class _Planner:
    """Walks the grid in the runner's order; one instance per ``build_plan`` call."""

    def __init__(self, experiment: Experiment, registries: Registries, selection: Selection, gpus: int) -> None:
        self.experiment, self.registries, self.selection, self.gpus = experiment, registries, selection, gpus
        self.notes: list[str] = []
        self.data = dataset_sizes(registries.datasets.get(experiment.data.dataset), experiment.data.options)
        self.train_examples = self.data.get("train")
        self.eval_examples = self._capped(self.data.get(experiment.evaluation.split), experiment.evaluation.max_examples)
        self.eval_work = self._eval_work()
        self.done: set[str] = set()  # cache keys of stages already listed: a repeat is a cache hit

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
            if extra.dataset not in self.registries.datasets:
                parts.append(f"{label}: unknown dataset {extra.dataset!r}")
                continue
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
    def models(self, family: ModelFamily) -> list[PlannedModel]:
        """The teacher and the selected students, as ``Runner.checkpoints`` picks them, with their sizes."""
        models = self.experiment.models
        teacher_label, student_labels = family.checkpoints(models.scale, models.students)
        if models.scale == "paper":
            overrides = models.student_paths.get(family.name, {})
            named = [("teacher", teacher_label, models.teachers.get(family.name, teacher_label))]
            named += [("student", label, overrides.get(label, name)) for label, name in student_labels.items()]
            return [self._paper_model(family, role, label, checkpoint) for role, label, checkpoint in named]
        archs = [("teacher", teacher_label, family.tiny_teacher)]
        archs += [("student", label, family.tiny_students[label]) for label in student_labels]
        return [PlannedModel(family.name, role, label, f"width {arch.width}, {arch.layers} layers, {arch.heads} heads",
                             tiny_model_size(family, arch, self.experiment.data)) for role, label, arch in archs]

    def _paper_model(self, family: ModelFamily, role: str, label: str, checkpoint: str) -> PlannedModel:
        try:
            return PlannedModel(family.name, role, label, checkpoint, paper_model_size(checkpoint, family))
        except KdbenchError as error:
            self.notes.append(f"{family.name}/{label}: size unknown, {error}")
            return PlannedModel(family.name, role, label, checkpoint, None, str(error))

    # -- stages -------------------------------------------------------------------------------
    def training(self, model: PlannedModel, objective: type[Objective], params: ObjectiveParams,
                 settings: TrainingConfig, teacher: PlannedModel | None) -> TrainingPlan:
        """How one model is trained, and its memory per GPU. ``teacher`` is given when it sits on the GPU."""
        if settings.max_steps is not None or self.train_examples is not None:
            steps: int | None = total_optimizer_steps(settings, self.train_examples or 0, self.gpus)
        else:
            steps = None
        estimated = settings.max_steps is None and self.data.estimated
        sequences = student_sequences(objective, params)
        teacher_params = teacher.size.params if teacher is not None and teacher.size is not None else 0
        deepspeed = settings.engine == "deepspeed"
        memory = None
        if model.size is not None:
            activations = estimate_activations(model.size, settings.batch_size, self.experiment.data.max_length,
                                               settings.precision, settings.gradient_checkpointing, sequences)
            # Plain accelerate mixes precision by autocast: fp32 weights, gradients and Adam state, replicated (DDP).
            # The runner loads the teacher once per family in the shared training precision, whatever a method's own.
            memory = estimate_memory(model.size.params, settings.precision if deepspeed else "fp32",
                                     settings.zero_stage if deepspeed else 0, self.gpus, teacher_params, activations,
                                     teacher_precision=self.experiment.training.precision)
        return TrainingPlan(model.label, model.size.params if model.size else None, objective.name, settings.engine,
                            settings.precision, settings.zero_stage if deepspeed else None, self.gpus,
                            settings.batch_size, settings.grad_accum, steps, estimated, sequences, teacher_params, memory)

    def train_stage(self, kind: StageKind, name: str, model: PlannedModel, objective: type[Objective],
                    params: ObjectiveParams, settings: TrainingConfig, seed: int, teacher: PlannedModel | None) -> Stage:
        """A training stage, or a reused one when the same model, objective, settings and seed were listed."""
        key = repr((model.key, objective.name, dataclasses.asdict(params), settings.model_dump(), seed,
                    teacher.key if teacher is not None else None))
        if key in self.done:
            return Stage(kind, name, f"reuses the {objective.name} training of {model.label} listed above", reused=True)
        self.done.add(key)
        plan = self.training(model, objective, params, settings, teacher)
        return Stage(kind, name, f"{objective.name} on {model.label}: {_steps(plan)} optimizer steps", plan)

    def family(self, family: ModelFamily, first: bool) -> FamilyPlan:
        experiment, selection = self.experiment, self.selection
        models = self.models(family)
        teacher, students = models[0], models[1:]
        sft = self.registries.objectives.get("sft")
        stages: list[Stage] = []
        if experiment.models.scale == "tiny":
            work = (f"byte-level BPE of {experiment.data.tokenizer_vocab_size:,} tokens on the training split, plus "
                    f"{len(TEMPLATE_PIECES)} template pieces")
            stages.append(Stage(StageKind.TOKENIZER, "data", work if first else "reuses the tokenizer listed above",
                                reused=not first))
            stages += [Stage(StageKind.INIT, f"{family.name}/{m.label}", f"random init, {m.checkpoint}") for m in models]
        if experiment.teacher.train:
            stages.append(self.train_stage(StageKind.TEACHER_SFT, f"{family.name}/{teacher.label}", teacher, sft,
                                           sft.make_params({}), experiment.teacher_training, experiment.teacher.seed, None))
        stages.append(Stage(StageKind.EVAL, f"{family.name}/{teacher.label}/{TEACHER_METHOD}", self.eval_work))

        generations = experiment.teacher_generations
        for student in students:
            for method in selection.methods:
                objective = self.registries.objectives.get(method)
                params = method_params(experiment, objective)
                needs = objective.needs_for(params)
                for seed in selection.seeds:
                    cell = f"{family.name}/{student.label}/{method}/seed{seed}"
                    if Need.SFT_INIT in needs:  # the same cache entry the sft cell of this student and seed trains
                        stages.append(self.train_stage(StageKind.SFT_INIT, cell, student, sft, sft.make_params({}),
                                                       experiment.training_for("sft"), seed, teacher))
                    if Need.TEACHER_GENERATIONS in needs:
                        stages.append(self.generation_stage(family, teacher, generations.max_new_tokens,
                                                            generations.batch_size))
                    # The runner keeps the teacher loaded from its SFT to the family's end: every student
                    # stage shares the GPU with it, whether or not its objective reads it.
                    stages.append(self.train_stage(StageKind.TRAIN, cell, student, objective, params,
                                                   experiment.training_for(method), seed, teacher))
                    stages.append(Stage(StageKind.EVAL, cell, self.eval_work))
        return FamilyPlan(family.name, models, stages)

    def generation_stage(self, family: ModelFamily, teacher: PlannedModel, max_new_tokens: int, batch_size: int) -> Stage:
        """Stored teacher samples: generated once per teacher, reused by every cell that reads them."""
        name = f"{family.name}/{teacher.label}"
        key = f"generations {teacher.key}"
        if key in self.done:
            return Stage(StageKind.GENERATIONS, name, "reuses the stored teacher generations listed above", reused=True)
        self.done.add(key)
        n, mark = self.train_examples, "≈" if self.data.estimated else ""
        if n is None:
            count = "? prompts"
        else:  # the runner shards the prompts over the processes
            share = -(-n // self.gpus)
            count = f"{mark}{n:,} prompts" + (f", {mark}{share:,} per GPU" if self.gpus > 1 else "")
            count += f", in {mark}{-(-share // batch_size):,} batches of {batch_size}"
        return Stage(StageKind.GENERATIONS, name, f"one teacher sample per training prompt: {count}, "
                     f"≤ {max_new_tokens} new tokens each")


def build_plan(experiment: Experiment, registries: Registries, selection: Selection, gpus: int = 1) -> Plan:
    """The stages ``kdbench run`` would go through for ``selection`` on ``gpus`` GPUs (processes), in run
    order, with model sizes, optimizer steps and memory per GPU. Loads no weights and trains nothing."""
    if gpus < 1:
        raise KdbenchError(f"the number of GPUs must be at least 1, got {gpus}.")
    planner = _Planner(experiment, registries, selection, gpus)
    families = [planner.family(registries.families.get(name), first=i == 0) for i, name in enumerate(selection.families)]
    data = planner.data
    notes = [f"training examples: {data.how}"]
    if data.sizes is not None:
        notes.append(f"records are counted before the prompt-length filter (data.max_prompt_length = "
                     f"{experiment.data.max_prompt_length} tokens), so step and example counts are upper bounds")
    if planner.train_examples is not None:
        trainings = [s.training for f in families for s in f.stages if s.training is not None]
        if any(-(-planner.train_examples // t.batch_size) < gpus for t in trainings):
            notes.append(f"{planner.train_examples:,} training examples give some GPU no micro-batch per epoch; "
                         "lower batch_size or the number of GPUs")
    notes += planner.notes
    notes.append("memory: ZeRO model states (Rajbhandari et al. 2020) plus the teacher, whole on every GPU in the training "
                 "precision (the runner keeps it loaded through every student stage of its family); activations are an "
                 "estimate (Korthikanti et al. 2022) for micro-batch × data.max_length = "
                 f"{experiment.data.max_length} tokens per sequence")
    return Plan(experiment.name, experiment.models.scale, gpus, experiment.data.dataset, planner.train_examples,
                planner.eval_examples, data, list(selection.eval_seeds), families, notes)


# -- printing -------------------------------------------------------------------------------------

def _gib(nbytes: int) -> str:
    if 0 < nbytes < GIB / 200:  # would print as 0.00, which reads as "nothing"
        return "<0.01"
    return f"{nbytes / GIB:.2f}"


def _steps(plan: TrainingPlan) -> str:
    return "?" if plan.steps is None else f"{'≈' if plan.steps_estimated else ''}{plan.steps:,}"


def _params(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def print_plan(plan: Plan, console: Console) -> None:
    """The plan as rich tables: models, stages in run order, training settings and memory per GPU."""
    mark = "≈" if plan.data.estimated else ""
    train = "?" if plan.train_examples is None else f"{mark}{plan.train_examples:,}"
    evaluation = "?" if plan.eval_examples is None else f"{mark}{plan.eval_examples:,}"
    console.print(f"[bold]Dry run of {plan.experiment}[/bold] — scale {plan.scale}, {plan.gpus} GPU(s), dataset "
                  f"{plan.dataset}: {train} training examples, {evaluation} evaluation examples × "
                  f"{len(plan.eval_seeds)} seeds. Nothing is loaded or trained.")
    for family in plan.families:
        models = Table(title=f"{family.family}: models")
        for column in ("role", "label", "checkpoint", "parameters", "layers × width, heads", "vocab", "size from"):
            models.add_column(column, justify="right" if column in ("parameters", "vocab") else "left")
        for model in family.models:
            size = model.size
            if size is None:
                models.add_row(model.role, model.label, model.checkpoint, "?", "?", "?", model.problem)
            else:
                models.add_row(model.role, model.label, model.checkpoint, f"{size.params:,}",
                               f"{size.layers} × {size.hidden}, {size.heads}", f"{size.vocab:,}", size.source)
        console.print(models)

        stages = Table(title=f"{family.family}: stages in run order")
        for column in ("#", "stage", "for", "work"):
            stages.add_column(column, justify="right" if column == "#" else "left")
        for number, stage in enumerate(family.stages, start=1):
            style = "dim" if stage.reused else None
            stages.add_row(str(number), stage.kind.value, stage.name, stage.work, style=style)
        console.print(stages)

        numbered = [(n, s) for n, s in enumerate(family.stages, start=1) if s.training is not None]
        if not numbered:
            continue
        training = Table(title=f"{family.family}: training stages")
        for column in ("#", "stage", "model", "params", "precision", "ZeRO", "GPUs",
                       "micro × accum × GPUs = global", "seqs", "optimizer steps"):
            training.add_column(column, justify="left" if column in ("stage", "model", "precision") else "right")
        memory = Table(title=f"{family.family}: memory per GPU, GiB (activations: estimate)")
        for column in ("#", "stage", "weights", "gradients", "optimizer", "teacher", "activations*", "total"):
            memory.add_column(column, justify="left" if column == "stage" else "right")
        for number, stage in numbered:
            t = stage.training
            assert t is not None
            what = f"{stage.kind.value} {stage.name}"
            zero = "DDP" if t.zero_stage is None else str(t.zero_stage)
            training.add_row(str(number), what, t.model, _params(t.params), t.precision, zero, str(t.gpus),
                             f"{t.batch_size} × {t.grad_accum} × {t.gpus} = {t.global_batch}", str(t.sequences), _steps(t))
            m = t.memory
            if m is None:
                memory.add_row(str(number), what, "?", "?", "?", "?", "?", "?")
            else:
                memory.add_row(str(number), what, _gib(m.weights), _gib(m.gradients), _gib(m.optimizer),
                               _gib(m.teacher) if m.teacher else "–", _gib(m.activations), _gib(m.total))
        console.print(training)
        console.print(memory)
    console.print("[bold]Notes[/bold]")
    for note in plan.notes:
        console.print(f"• {note}", markup=False)
    console.print("• seqs: sequences per prompt the student runs with gradients in a micro-batch (gold, teacher text, "
                  "own sample, rollout); ≈: from documented data sizes; *: activations after Korthikanti et al. 2022, "
                  "per layer s·b·h·(34 + 5·a·s/h) bytes in 16-bit (2·s·b·h with gradient checkpointing) plus the output "
                  "layer, an estimate", markup=False)
