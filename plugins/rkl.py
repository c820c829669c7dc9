"""rkl — token-level reverse KL on the training sequence (mode-seeking).

With the teacher under teacher forcing on the training sequence (``GOLD``: gold, or the teacher's samples
with ``train_on: teacher_text``), at every response position:
``L_rkl = KL(q‖p) = Σ_v q(v|x,y<t)·(log q(v|x,y<t) − log p(v|x,y<t))``, both logits divided by τ.
The exact per-token reverse KL MiniLLM adds as its single-step term, here on fixed sequences instead of
rollouts. docs/objectives.md, "rkl".
"""

from __future__ import annotations

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import reverse_kl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


class ReverseKL(Objective):
    name = "rkl"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "token-level reverse KL(q‖p) to the teacher on the training sequence (mode-seeking)"
    paper = "reverse-KL KD, as compared by MiniLLM (Gu et al. 2024, arXiv 2306.08543) and GKD (arXiv 2306.13649)"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = TemperatureParams

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:  # (b, t)
        return reverse_kl(*inputs[GOLD].logits(), params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [ReverseKL]
