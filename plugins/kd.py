"""kd — word-level knowledge distillation (forward KL), Hinton et al. 2015; Kim & Rush 2016.

With the teacher run under teacher forcing on the training sequence (``GOLD``: the gold response, or the
teacher's sample with ``train_on: teacher_text``), at every response position:
``L_kd = Σ_v p(v|x,y<t) · (−log q(v|x,y<t))`` — the soft cross-entropy, equal to the forward
KL(p‖q) plus the teacher's entropy (constant in the student). A temperature τ divides both
logits. docs/objectives.md, "kd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import soft_cross_entropy
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


@dataclass(frozen=True)
class KDParams(TemperatureParams):
    """kd_ratio, train_on and the temperature τ."""


class KD(Objective):
    name = "kd"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "word-level KD: soft cross-entropy to the teacher's next-token distribution (forward KL)"
    paper = "Hinton et al. 2015 (arXiv 1503.02531); word-level KD of Kim & Rush 2016 (arXiv 1606.07947)"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.MINIMUM  # H(p) there
    Params = KDParams

    @staticmethod
    def loss(inputs: LossInputs, params: KDParams) -> torch.Tensor:  # (b, t)
        return soft_cross_entropy(*inputs[GOLD].logits(), params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [KD]
