"""tvd — total variation distance to the teacher's next-token distribution.

At every response position of the training sequence, under teacher forcing:
``L_tvd = ½·Σ_v |p(v|x,y<t) − q(v|x,y<t)|``, in [0, 1], both logits divided by τ: bounded, and symmetric in
the two models. docs/objectives.md, "tvd".
"""

from __future__ import annotations

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import tvd
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


class TVD(Objective):
    name = "tvd"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "total variation distance ½·Σ|p − q| to the teacher on the training sequence"
    paper = "Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation (arXiv 2307.15190)"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = TemperatureParams

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:  # (b, t)
        return tvd(*inputs[GOLD].logits(), params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [TVD]
