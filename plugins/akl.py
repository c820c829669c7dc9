"""akl — adaptive KL (Wu et al. 2025, Rethinking Kullback-Leibler Divergence in KD for LLMs, COLING).

At every response position of the training sequence, under teacher forcing: the vocabulary splits into
the teacher's head (its top tokens holding mass μ = 0.5) and tail; with ``g_head = Σ_head |p − q|`` and
``g_tail = Σ_tail |p − q|`` (no gradient through either, as in DSKD's ``code/criterions/``),
``L_akl = g_head/(g_head + g_tail)·KL(p‖q) + g_tail/(g_head + g_tail)·KL(q‖p)``: forward KL where the
student misses the head, reverse KL where it misses the tail. Both logits divided by τ.
docs/objectives.md, "akl".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import adaptive_kl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


@dataclass(frozen=True)
class AKLParams(TemperatureParams):
    mu: float = 0.5  # the teacher mass its head holds

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 < self.mu < 1.0:
            problems.append(f"mu must be in (0, 1), got {self.mu}")
        return problems


class AdaptiveKL(Objective):
    name = "akl"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "adaptive KL: forward and reverse KL weighted by the student's gaps on the teacher's head and tail"
    paper = "Wu et al. 2025, Rethinking Kullback-Leibler Divergence in Knowledge Distillation for LLMs (COLING; arXiv 2404.02657)"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = AKLParams

    @staticmethod
    def loss(inputs: LossInputs, params: AKLParams) -> torch.Tensor:  # (b, t)
        return adaptive_kl(*inputs[GOLD].logits(), params.mu, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [AdaptiveKL]
