"""What each kind of stage node carries for its builder, beside the inputs that make its key (none of this is part
of a key): the specs ``kdbench.grid.collect`` fills in and the builders (``kdbench.grid.stages``), the dry run and the
executors read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.config import DataConfig, TeacherGenerationConfig, TrainingConfig, config_hash
from kdbench.grid.estimate import ModelSize, paper_model_size, tiny_model_size
from kdbench.objectives import Objective, ObjectiveParams
from kdbench.train.step import StepPlan
from kdbench.zoo import ModelFamily, TinyArch

# Keys of a cell's config that are its row's own (the method's settings) or its seed's (the training seed and
# the student initialised with it); everything else is shared by every cell it is compared with.
METHOD_KEYS = ("method", "params", "method_training", "student", "seed")


@dataclass(frozen=True)
class CheckpointSpec:
    label: str  # the teacher's or student's label in the family
    path: str  # hub name or local folder
    family: ModelFamily

    def size(self, data: DataConfig) -> ModelSize:
        """From its config alone (local folder, HF cache or the family's table); KdbenchError when none is found."""
        return paper_model_size(self.path, self.family)

    def recorded_training(self) -> dict[str, Any] | None:
        """The training statistics a folder made by kdbench carries (a shipped tiny teacher), else None."""
        record = Path(self.path) / "train_stats.json"
        return json.loads(record.read_text()) if record.is_file() else None


@dataclass(frozen=True)
class InitSpec:
    label: str  # the teacher's or student's label in the family
    family: ModelFamily
    arch: TinyArch
    seed: int

    def size(self, data: DataConfig) -> ModelSize:
        """As the init stage builds it, from the family's config class."""
        return tiny_model_size(self.family, self.arch, data)


@dataclass(frozen=True)
class SelectSpec:
    """How a training stage picks the checkpoint it hands on: ``metric`` ("loss", or an evaluation metric
    generated with ``greedy`` decoding) on the validation split every ``every`` steps; the best, or the final."""

    metric: str
    every: int
    keep_best: bool
    greedy: bool
    max_examples: int | None
    max_new_tokens: int


@dataclass(frozen=True)
class TrainSpec:
    objective: type[Objective]
    params: ObjectiveParams
    settings: TrainingConfig
    seed: int
    select: SelectSpec
    plan: StepPlan  # what its steps read and need, resolved once here (kdbench.train.step)


@dataclass(frozen=True)
class GenerateSpec:
    settings: TeacherGenerationConfig


@dataclass(frozen=True)
class Cell:
    """One leaderboard entry to produce: (family, student, method, training seed) and its resolved settings."""

    family: str
    student: str
    method: str
    seed: int
    kind: str  # "student", or "teacher" for the teacher's own row
    config: dict[str, Any]
    eval_seeds: list[str]
    teacher: str  # key of the family's teacher model (its size goes into every row of the family)

    @property
    def label(self) -> str:
        return f"{self.family}/{self.student}/{self.method}/seed{self.seed}"

    @property
    def shared_hash(self) -> str:
        """Hash of everything but the objective: equal across the cells a leaderboard compares."""
        return config_hash({k: v for k, v in self.config.items() if k not in METHOD_KEYS})
