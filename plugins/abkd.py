"""abkd — knowledge distillation by the α-β divergence (Wang et al. 2025, ABKD, ICML; arXiv 2505.04560).

At every response position of the training sequence, under teacher forcing, both logits divided by τ:
``L = −1/(αβ)·Σ_v [p^α·q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β)]``, α = 0.2, β = 0.7 (the released GPT-2
scripts' values). α = 1, β = 0 is the forward KL and α = 0, β = 1 the reverse KL; between them α sets how
hard the student is pulled onto the teacher's modes ("hardness concentration") and β how much of its mass
it keeps off tokens the teacher rules out ("confidence concentration"). Where an exponent is 0 the loss is
the divergence's continuous limit (``kdbench.losses.alpha_beta_divergence``), which scales the released
code's special cases for α ≠ 1 by a further 1/α. docs/objectives.md, "abkd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import alpha_beta_divergence
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


@dataclass(frozen=True)
class ABKDParams(TemperatureParams):
    alpha: float = 0.2
    beta: float = 0.7

    def check(self) -> list[str]:
        problems = super().check()
        if not (self.alpha >= 0 and self.beta >= 0):
            problems.append(f"alpha and beta must be ≥ 0, got alpha={self.alpha}, beta={self.beta}")
        return problems


class ABKD(Objective):
    name = "abkd"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "ABKD: α-β divergence to the teacher on the training sequence (α = 0.2, β = 0.7)"
    paper = "Wang et al. 2025, ABKD: Pursuing a Proper Allocation of the Probability Mass in KD via α-β-Divergence (ICML)"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = ABKDParams

    @staticmethod
    def loss(inputs: LossInputs, params: ABKDParams) -> torch.Tensor:  # (b, t)
        return alpha_beta_divergence(*inputs[GOLD].logits(), params.alpha, params.beta, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [ABKD]
