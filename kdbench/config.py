"""Experiment files: YAML loaded into typed, validated config objects.

``load_experiment`` reports every problem at once, one line per field with its path
(``training.lr: Input should be greater than 0``), so a user fixes a file in one pass. The
resolved config of a cell, and its hash, are written next to its result.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdbench.errors import KdbenchError

DEFAULT_EXPERIMENT = "tiny.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    dataset: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)
    max_length: int = Field(128, gt=8)
    max_prompt_length: int = Field(96, gt=4)
    tokenizer_vocab_size: int = Field(1024, ge=300, description="tiny scale only: size of the BPE trained on the data")

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        return self


class ModelsConfig(Strict):
    scale: Literal["tiny", "paper"] = "tiny"
    families: list[str] = Field(default_factory=lambda: ["gpt2", "opt"], min_length=1)
    students: list[str] | None = Field(None, description="student labels to run; all of the scale when omitted")
    teachers: dict[str, str] = Field(default_factory=dict, description="family → hub name or local path override")
    student_paths: dict[str, dict[str, str]] = Field(default_factory=dict, description="family → label → path override")


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
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more compute")

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of epochs or max_steps")
        return self


class TeacherConfig(Strict):
    train: bool = Field(True, description="SFT the teacher on the training split first (always at tiny scale)")
    training: TrainingConfig | None = None
    seed: int = 0


class TeacherGenerationConfig(Strict):
    """Stored teacher samples for methods that need them (seqkd, dpkd): one per training prompt,
    sampled at temperature 1 with top-k 0 and top-p 1, generated once and cached."""

    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(100, ge=1)
    seed: int = 0


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


class Experiment(Strict):
    name: str
    description: str = ""
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
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="accelerate trackers that log every training stage; off when empty")

    @property
    def teacher_training(self) -> TrainingConfig:
        return self.teacher.training or self.training

    def training_for(self, method: str) -> TrainingConfig:
        """The shared ``training`` with the method's own overrides (``method_training``) applied."""
        overrides = self.method_training.get(method)
        if not overrides:
            return self.training
        return TrainingConfig.model_validate({**self.training.model_dump(), **overrides})

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
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        given = "" if item["type"] == "missing" else f" (given: {item.get('input')!r})"
        lines.append(f"  {path}: {item['msg']}{given}")
    return f"{source} has {len(lines)} error(s):\n" + "\n".join(lines)


def parse_experiment(raw: Any, source: str) -> Experiment:
    if not isinstance(raw, dict):
        raise KdbenchError(f"{source} must hold a YAML mapping of experiment fields, got {type(raw).__name__}.")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as error:
        raise KdbenchError(_format_errors(error, source)) from None


def read_experiment_yaml(path: Path | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of ``path``, or of the embedded ``experiments/tiny.yaml`` when None."""
    if path is None:
        text = resources.files("kdbench.experiments").joinpath(DEFAULT_EXPERIMENT).read_text(encoding="utf-8")
        source = f"experiments/{DEFAULT_EXPERIMENT} (embedded default)"
    else:
        if not path.is_file():
            raise KdbenchError(f"experiment file {path} does not exist; expected a YAML file such as experiments/tiny.yaml.")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        return yaml.safe_load(text), source
    except yaml.YAMLError as error:
        raise KdbenchError(f"{source} is not valid YAML: {error}") from None


def load_experiment(path: Path | None = None) -> Experiment:
    raw, source = read_experiment_yaml(path)
    return parse_experiment(raw, source)


def config_hash(payload: Any) -> str:
    """A stable hash of any JSON-able payload (sorted keys), used for cache keys and results."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
