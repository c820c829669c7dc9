"""skl — DistiLLM's skew KL divergence (Ko et al. 2024, arXiv 2402.03898).

At every response position of the training sequence, under teacher forcing:
``L_skl = KL(p ‖ α·p + (1 − α)·q)``, α = 0.1, both logits divided by τ. Mixing a little of the teacher
into the student's side bounds the divergence (by −log α) and its gradient where q is tiny and p is not;
α = 0 is the forward KL. ``srkl`` is the reverse counterpart. docs/objectives.md, "skl".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import skew_forward_kl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams

DISTILLM = "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models (arXiv 2402.03898)"


@dataclass(frozen=True)
class SkewParams(TemperatureParams):
    alpha: float = 0.1  # DistiLLM's skew α

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 <= self.alpha < 1.0:
            problems.append(f"alpha must be in [0, 1), got {self.alpha}")
        return problems


class SkewKL(Objective):
    name = "skl"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "DistiLLM skew KL: KL(p ‖ α·p + (1−α)·q) on the training sequence, α = 0.1"
    paper = DISTILLM
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = SkewParams

    @staticmethod
    def loss(inputs: LossInputs, params: SkewParams) -> torch.Tensor:  # (b, t)
        return skew_forward_kl(*inputs[GOLD].logits(), params.alpha, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [SkewKL]
