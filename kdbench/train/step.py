"""What one training step of an objective reads and needs, resolved once per training stage.

``plan_step`` answers, from the objective, its parameters, the sequence sources installed and the stage's
settings: which roles a step fills and which source fills each, which sources it reads, whether it needs the
teacher's logits (and whether those are all on gold sequences, so the teacher-outputs stage can serve them), whether
a source samples from the teacher or reads its stored generations, whether the LM term runs the teacher, and the
dtype the losses make the logits in. The grid (a stage's deps, the dry run), the engine and the contract kit read
the one ``StepPlan``; nothing else derives any of it. Every input is part of the training stage's cache key (the
objective and its version, the sources and theirs, the parameters, the settings), so the key fixes the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from kdbench.config import TrainingConfig
from kdbench.objectives import GOLD, Need, Objective, ObjectiveParams

if TYPE_CHECKING:
    from kdbench.contracts import SequenceSource

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_reads(objective: type[Objective], params: ObjectiveParams) -> tuple[str, ...]:
    """The sources a step of ``objective`` reads, each once: the one filling GOLD (``train_on``), then the
    objective's. What the config check asks of the registry before any source class is looked up."""
    return tuple(dict.fromkeys(_source_of(role, params) for role in _roles(objective, params)))


def _roles(objective: type[Objective], params: ObjectiveParams) -> tuple[str, ...]:
    # GOLD always (the CE term), then the objective's reads, unless kd_ratio = 0 leaves only the CE to compute.
    return (GOLD,) if params.kd_ratio == 0 else tuple(dict.fromkeys((GOLD, *objective.reads)))


def _source_of(role: str, params: ObjectiveParams) -> str:
    return params.train_on if role == GOLD else role


@dataclass(frozen=True)
class StepPlan:
    roles: tuple[str, ...]  # the roles a step fills: GOLD (the CE term), then the objective's reads
    role_sources: tuple[tuple[str, str], ...]  # (role, the source that fills it)
    reads: tuple[str, ...]  # the sources, each once, in role order
    teacher_logits: bool  # the objective needs the teacher's logits under teacher forcing (never with kd_ratio 0)
    logits_on_gold: bool  # ... all on gold training sequences: the teacher-outputs stage can serve them
    teacher_samples: bool  # a source it reads samples from the teacher while training runs
    teacher_generations: bool  # a source it reads the teacher's stored generations
    samples_student: bool  # a source draws from the student: the sample bound joins the stage's key
    lm_distils: bool  # the pre-training LM term's word-KD half runs the teacher
    head_dtype: torch.dtype | None  # the dtype the losses make the step's logits in (fused_head); None: the model's
    lm_head_dtype: torch.dtype | None  # the same for the LM term, whose losses always take the head

    def source_of(self, role: str) -> str:
        return dict(self.role_sources)[role]

    def uses_teacher(self, stored_logits: bool) -> bool:
        """Whether the teacher model is loaded while the stage trains: for its logits (unless the teacher-outputs
        stage serves them), for a source that samples from it, or for the LM term's word-KD."""
        return (self.teacher_logits and not stored_logits) or self.teacher_samples or self.lm_distils


class SourceClasses(Protocol):
    """Source classes by name: a dict, or the registry's ``sources``."""

    def __getitem__(self, name: str, /) -> type[SequenceSource]: ...


def plan_step(objective: type[Objective], params: ObjectiveParams, sources: SourceClasses,
              settings: TrainingConfig) -> StepPlan:
    """The one ``StepPlan`` of a training stage; ``sources`` must hold every source the step reads."""
    roles = _roles(objective, params)
    reads = step_reads(objective, params)
    read = [sources[name] for name in reads]
    teacher_logits = params.kd_ratio > 0 and Need.TEACHER_LOGITS in objective.needs_for(params)
    fusable = objective.fused_head or params.kd_ratio == 0  # every loss of the step takes the head (the CE term does)
    precision = PRECISION_DTYPES[settings.precision] if settings.fused_head else None
    return StepPlan(
        roles=roles,
        role_sources=tuple((role, _source_of(role, params)) for role in roles),
        reads=reads,
        teacher_logits=teacher_logits,
        logits_on_gold=teacher_logits and all(_source_of(role, params) == GOLD for role in objective.reads),
        teacher_samples=any(Need.TEACHER_MODEL in source.needs for source in read),
        teacher_generations=any(Need.TEACHER_GENERATIONS in source.needs for source in read),
        samples_student=any(source.samples_student for source in read),
        lm_distils=settings.lm_coef > 0 and settings.lm_kd_ratio > 0,
        head_dtype=precision if fusable else None,
        lm_head_dtype=precision,
    )
