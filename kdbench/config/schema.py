"""The experiment schema: typed, validated config objects, one per block of an experiment file, and the hash of
a resolved config (written next to each cell's result and part of every stage key)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

DEFAULT_EXPERIMENT = "tiny.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    dataset: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)
    # Upper bounds far beyond any model's context or vocabulary: a mistyped size is refused here, not met as an
    # allocation of terabytes (or an integer overflow) when a model is built for it.
    max_length: int = Field(128, gt=8, le=2**20)
    max_prompt_length: int = Field(96, gt=4, le=2**20)
    tokenizer_vocab_size: int = Field(1024, ge=300, le=2**20,
                                      description="tiny scale only: size of the BPE trained on the data")

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        return self


class ModelsConfig(Strict):
    scale: Literal["tiny", "paper"] = "tiny"
    families: list[str] = Field(default_factory=lambda: ["gpt2", "opt"], min_length=1)
    students: list[str] | None = Field(None, description="student labels to run; when omitted, every "
                                      "paper-scale student, or the first (smallest) tiny one")
    teachers: dict[str, str] = Field(default_factory=dict, description="family → hub name or local path override")
    student_paths: dict[str, dict[str, str]] = Field(default_factory=dict, description="family → label → path override")
    bases: dict[str, str] = Field(default_factory=dict, description=(
        "tiny scale: family → a folder of pretrained base models made by `kdbench export-bases`, <folder>/<label> per "
        "teacher and student, that the teacher's SFT and the students start from instead of pretraining them"))
    sft_inits: dict[str, str] = Field(default_factory=dict, description=(
        "family → a folder of SFT inits made by `kdbench export-inits`, <folder>/<student>/seed<k> per student and "
        "training seed, that the methods starting from the SFT student read instead of training it"))
    trust_remote_code: list[str] = Field(default_factory=list, description=(
        "checkpoints (hub names or folders, as written in models or the family's table) allowed to run the Python "
        "code they ship when loaded; none by default, as that code runs with your rights"))


class TrainingConfig(Strict):
    engine: Literal["deepspeed", "accelerate"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1, description="examples per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; all cores when omitted")
    length_bucket: int = Field(16, ge=1, description="micro-batches per bucket sorted by length (less padding); 1: "
                               "random batches, which mix tasks whose lengths differ (the tiny suite)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more compute")
    lm_coef: float = Field(0.0, ge=0, description="weight of the pre-training LM term on lm_data (MiniLLM's lm_coef = 1; "
                           "0: none)")
    lm_kd_ratio: float = Field(0.5, ge=0, le=1, description="the LM term's own mix, (1 − r)·CE + r·word-KD on lm_data")
    fused_head: bool = Field(False, description=(
        "make the logits a piece of positions at a time inside the losses, from the hidden states and the LM head, so "
        "the full (tokens × vocabulary) logits and their gradient never exist at once (objectives that allow it, the CE "
        "term and the LM term); the same values up to rounding. Not with ZeRO-3, which partitions the head"))

    # Settings added after results were published, which change no number beyond rounding: left out of the dump
    # (so out of every stage key and config hash) at their default, so the keys of earlier results stay valid.
    KEYED_WHEN_SET: ClassVar[dict[str, Any]] = {"fused_head": False}

    @model_serializer(mode="wrap")
    def _left_out_at_default(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for name, default in self.KEYED_WHEN_SET.items():
            if dumped.get(name, default) == default:
                dumped.pop(name, None)
        return dumped

    @model_validator(mode="after")
    def _a_length(self) -> TrainingConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps (both: whichever ends first, as MiniLLM's 5,000 steps or 10 epochs)")
        return self

    @model_validator(mode="after")
    def _head_whole(self) -> TrainingConfig:
        if self.fused_head and self.engine == "deepspeed" and self.zero_stage == 3:
            raise ValueError("fused_head reads the LM head's weight outside the model's forward pass, where ZeRO-3 holds "
                             "only this process's shard of it; use zero_stage 1 or 2, or fused_head: false")
        return self


BUDGET_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum")  # what sets a stage's optimizer steps and data
# What no method may set for itself under the uniform protocol: its budget, and the pre-training term.
UNIFORM_FIELDS = (*BUDGET_FIELDS, "lm_coef", "lm_kd_ratio")


class LmDataConfig(Strict):
    """The plain-text corpus of the pre-training LM term (MiniLLM's OpenWebText; the tiny suite's world as text)."""

    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)
    max_chunks: int | None = Field(None, ge=1, description="max_length-token chunks kept (all when omitted)")


class PretrainConfig(Strict):
    """Tiny scale: every model (teacher and students) starts from a base pretrained on a plain-text corpus, as GPT-2
    and OPT start from WebText-like text; one base per architecture, shared by every training seed."""

    corpus: LmDataConfig = Field(description="the plain text, packed into data.max_length-token chunks")
    training: TrainingConfig
    seed: int = Field(0, description="the random initialisation and data order of every base")
    select_every: int = Field(100, ge=1, description="optimizer steps between validation-loss checks; the base with "
                              "the lowest loss on the held-out chunks is kept")
    validation_chunks: int = Field(64, ge=1, description="chunks held out from the end of the corpus for that loss")


class InstructionSetConfig(Strict):
    """An instruction data set by name and options, its splits read like ``data``'s."""

    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)


class SelectionConfig(Strict):
    """Which checkpoint of a training stage is handed on: the best on the validation split (both reference
    codebases keep the best validation ROUGE-L: LMOps ``minillm/README.md:128``, ``dpkd/main.py:537-546``),
    or the final one."""

    rule: Literal["best", "final"] = "best"
    metric: str = Field("rougeL", description="a metric of evaluation.metrics, scored on the validation split")
    every: int = Field(50, ge=1, description="optimizer steps between validations; the last step is always validated")
    greedy: bool = Field(True, description="greedy decoding for validation (cheap, deterministic); false samples "
                         "once with seed 0")
    max_examples: int | None = Field(None, ge=1, description="validation prompts scored (all when omitted)")


class InitConfig(Strict):
    """The SFT student other stages start from: one per (student, training seed), trained on gold with its own
    budget and selected by validation loss (MiniLLM's init, ``minillm/README.md:188``) or, with ``rule: final``, kept at
    its last step."""

    start: Literal["sft", "base"] = Field("sft", description="uniform protocol: every method starts from the shared "
                                          "SFT student (sft) or from the base model (base)")
    training: TrainingConfig | None = Field(None, description="the SFT init's training; `training` when omitted")
    select_every: int | None = Field(None, ge=1, description="optimizer steps between the init's validation-loss "
                                     "checks; `selection.every` when omitted (a long init validates less often)")
    rule: Literal["best", "final"] = Field("best", description=(
        "best: the checkpoint of lowest validation loss (MiniLLM's init); final: the last one, its loss curve recorded "
        "(an init trained onto a flat loss curve, where the lowest point is noise)"))


class TeacherConfig(Strict):
    train: bool = Field(True, description="SFT the teacher on the training split first (always at tiny scale)")
    training: TrainingConfig | None = None
    data: InstructionSetConfig | None = Field(None, description=(
        "the teacher's own instruction set for its SFT (a larger, cleaner one than the distillation set); the "
        "experiment's data when omitted. Validation and evaluation always use the experiment's data"))
    selection: SelectionConfig | None = Field(None, description="the teacher stage's checkpoint selection; "
                                              "`selection` when omitted (a long teacher run validates less often)")
    seed: int = 0


class TeacherGenerationConfig(Strict):
    """Stored teacher samples for methods that need them (seqkd, dpkd): one per training prompt,
    sampled at temperature 1 with top-k 0 and top-p 1, generated once and cached."""

    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(100, ge=1)
    seed: int = 0


class TeacherOutputsConfig(Strict):
    """The teacher's distributions on the gold training sequences, computed once per teacher and read by every
    teacher-forced method, seed and epoch instead of a teacher forward pass per step (kdbench.train.teacher_outputs)."""

    share: bool = Field(False, description="compute them once in a teacher-outputs stage (off: every stage runs the "
                        "teacher itself)")
    top_k: int | None = Field(None, ge=1, description="keep the k most probable tokens per position and spread the "
                              "rest of the mass evenly over the others; omitted: the exact distribution (vocab × 4 "
                              "bytes per response token)")
    batch_size: int = Field(256, ge=1, description="sequences per teacher forward pass")


class EvalDatasetConfig(Strict):
    """An extra evaluation set (SelfInst, Vicuna, S-NI, UnNI beside Dolly): scored like the main one,
    its metrics reported as ``<label>/<metric>`` columns."""

    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)
    split: Literal["validation", "test"] = "test"
    min_response_tokens: int = Field(0, ge=0, description="keep records whose gold response has at least this many "
                                     "tokens (the papers' S-NI / UnNI subset: 11)")
    max_examples: int | None = Field(None, ge=1)


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks scored on the in-memory model of every student and teacher."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task names; kdbench_heldout is the "
                             "experiment's evaluation split as a local generation task")
    include_path: str | None = Field(None, description="folder of extra lm-eval task YAML files")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1, description="examples per task (all when omitted)")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(64, ge=1, description="generation bound of kdbench_heldout")


class EvaluationConfig(Strict):
    split: Literal["validation", "test"] = "test"
    metrics: list[str] = Field(default_factory=lambda: ["rougeL", "exact_match"], min_length=1)
    primary_metric: str | None = Field(None, description="the metric leaderboards rank by; the first of metrics "
                                       "when omitted")
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50], min_length=1)
    greedy: bool = False
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(100, ge=1)
    max_examples: int | None = Field(None, ge=1)
    datasets: dict[str, EvalDatasetConfig] = Field(default_factory=dict, description="label → extra evaluation set")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)

    @property
    def primary(self) -> str:
        """The metric leaderboards rank by."""
        return self.primary_metric or self.metrics[0]

    @model_validator(mode="after")
    def _primary_is_a_metric(self) -> EvaluationConfig:
        if self.primary_metric is not None and self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not one of metrics {self.metrics}")
        return self


class RuntimeConfig(Strict):
    """How a run watches itself (kdbench.runtime): in no stage key or config hash, since none of it changes a result."""

    stall_seconds: float = Field(900.0, gt=0, description=(
        "a stage that reports no progress (no optimizer step, evaluation or generated batch) for this long gets a "
        "message naming what it last did, and every thread's stack in the run's log"))
    on_stall: Literal["warn", "fail"] = Field("warn", description=(
        "warn: say so again every stall_seconds and keep waiting; fail: end the stage as failed"))
    collective_timeout_seconds: float = Field(600.0, gt=0, description=(
        "how long a training or generation collective waits for the other processes of a launch before it fails "
        "the stage on every process (torch's default is 30 minutes)"))
    wait_timeout_seconds: float = Field(3 * 3600.0, gt=0, description=(
        "how long the other processes of a launch wait while the main one alone works (a cache entry, lm-eval, "
        "another worker's stage) before they give up"))
    max_estimated_days: float = Field(30.0, gt=0, description=(
        "run and validate refuse a grid whose estimated wall time (the dry run's, kdbench.grid.timing) is longer; "
        "raise it when such a budget is intended (or pass --allow-long-budget)"))


class ControlConfig(Strict):
    """A positive control: on ``task`` a published mechanism predicts that objective ``better`` scores above
    ``worse``. The report tests the prediction from the rows' per-task scores; a control is in no stage key or config
    hash, so declaring or editing one re-runs nothing."""

    task: str = Field(min_length=1, description="a task label of the experiment's data (tiny: modes, long, ...)")
    better: str = Field(min_length=1, description="the method predicted to score higher on the task")
    worse: str = Field(min_length=1, description="the method predicted to score lower on the task")
    mechanism: str = Field(description="why the difference is predicted, in a sentence")
    source: str = Field("", description="the paper the mechanism comes from")

    @field_validator("mechanism")
    @classmethod
    def _said(cls, mechanism: str) -> str:
        if not mechanism.strip():
            raise ValueError("a control states why its difference is predicted; write the mechanism in a sentence")
        return mechanism

    @model_validator(mode="after")
    def _two_methods(self) -> ControlConfig:
        if self.better == self.worse:
            raise ValueError(f"better and worse are both {self.better!r}; a control compares two different methods")
        return self


class Experiment(Strict):
    name: str
    description: str = ""
    protocol: Literal["uniform", "paper"] = Field(description=(
        "uniform: every method starts from the same checkpoint with the same budget (docs/protocols.md); paper: each "
        "method follows its released recipe"))
    init: InitConfig = Field(default_factory=InitConfig)
    pretrain: PretrainConfig | None = Field(None, description=(
        "tiny scale: pretrain every model on a corpus before any instruction (paper-scale checkpoints come "
        "pretrained); off: tiny models start from a random initialisation"))
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    lm_data: LmDataConfig | None = Field(None, description="corpus of the pre-training LM term (training.lm_coef)")
    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    training: TrainingConfig
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"sft": {}, "kd": {}}, min_length=1)
    method_training: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method → fields of `training` it overrides (MiniLLM's lr 5e-6 for "
        "5,000 steps); part of that method's own settings, like its parameters")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="training seeds; one cell each")
    teacher_generations: TeacherGenerationConfig = Field(default_factory=TeacherGenerationConfig)
    teacher_outputs: TeacherOutputsConfig = Field(default_factory=TeacherOutputsConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    controls: list[ControlConfig] = Field(default_factory=list, description=(
        "positive controls: pairs of methods whose difference on a task a published mechanism predicts; the report "
        "tests each one. In no stage key or config hash: adding or editing one re-runs nothing"))
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="accelerate trackers that log every training stage; off when empty")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    checkpoint_every: int = Field(100, ge=1, description=(
        "optimizer steps between a training stage's resume checkpoints (model, optimizer, scheduler, every RNG, "
        "data order, on-policy buffers, selection; one more after the last step): a killed `kdbench run` "
        "continues the stage from the latest with the same final numbers. In no stage key: it changes no result"))

    @property
    def teacher_training(self) -> TrainingConfig:
        return self.teacher.training or self.training

    @field_validator("name")
    @classmethod
    def _a_folder_name(cls, name: str) -> str:
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError("the name is also the results folder (results/<name>), so it must be a folder name: "
                             "not empty, not . or .., without / \\ or NUL characters (such as tiny)")
        return name

    @property
    def init_training(self) -> TrainingConfig:
        return self.init.training or self.training

    @property
    def init_select_every(self) -> int:
        return self.init.select_every or self.selection.every

    def training_for(self, method: str) -> TrainingConfig:
        """The shared ``training`` with the method's own overrides (``method_training``) applied."""
        overrides = self.method_training.get(method)
        if not overrides:
            return self.training
        return TrainingConfig.model_validate({**self.training.model_dump(), **overrides})

    @model_validator(mode="after")
    def _pretraining_is_tiny(self) -> Experiment:
        tiny_only = [name for name, given in (("pretrain", self.pretrain is not None),
                                              ("models.bases", bool(self.models.bases))) if given]
        if tiny_only and self.models.scale != "tiny":
            raise ValueError(f"{' and '.join(tiny_only)}: pretraining applies to tiny models, but models.scale is "
                             f"{self.models.scale!r}, whose checkpoints come pretrained; remove them or use scale tiny")
        return self

    @model_validator(mode="after")
    def _method_training_is_valid(self) -> Experiment:
        errors = []
        for method, overrides in self.method_training.items():
            unknown = sorted(set(overrides) - set(TrainingConfig.model_fields))
            if unknown:
                errors.append(f"method_training.{method}: {unknown} are not training fields; expected some of "
                              f"{sorted(TrainingConfig.model_fields)}")
                continue
            try:
                self.training_for(method)
            except ValidationError as error:
                errors += [f"method_training.{method}.{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}"
                           for e in error.errors()]
            budget = sorted(set(overrides) & set(UNIFORM_FIELDS))
            if self.protocol == "uniform" and budget:
                errors.append(f"method_training.{method}: {budget} change the budget or the LM term, but protocol uniform "
                              "gives every method the same ones; remove them, or use protocol: paper")
        with_lm_term = [f"method_training.{m}" for m, o in self.method_training.items() if (o.get("lm_coef") or 0) > 0]
        with_lm_term += ["training"] if self.training.lm_coef > 0 else []
        if with_lm_term and self.lm_data is None:
            errors.append(f"{', '.join(with_lm_term)}: lm_coef > 0 asks for a pre-training LM term, but lm_data (its "
                          "corpus) is not set; add lm_data: {dataset: ...} or set lm_coef: 0")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def config_hash(payload: Any) -> str:
    """A stable hash of any JSON-able payload (sorted keys), used for cache keys and results."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
