"""jeffreys — the symmetric KL divergence, half forward and half reverse.

At every response position of the training sequence, under teacher forcing:
``L = ½·KL(p‖q) + ½·KL(q‖p)``, both logits divided by τ: Jeffreys' divergence, halved. The forward half
covers the teacher's modes, the reverse half keeps the student off tokens the teacher rules out.
"""

from __future__ import annotations

import torch
from kdbench import Objective, hookimpl
from kdbench.losses import forward_kl, reverse_kl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


class Jeffreys(Objective):
    name = "jeffreys"
    summary = "symmetric KL: ½·KL(p‖q) + ½·KL(q‖p) on the training sequence (an example plugin)"
    paper = "Jeffreys 1946, An Invariant Form for the Prior Probability in Estimation Problems"
    version = 1  # bump when the loss changes: the cells it trained get new keys and re-run
    needs = frozenset({Need.TEACHER_LOGITS})
    reads = (GOLD,)
    at_teacher = AtTeacher.ZERO  # a divergence: the kit checks it is 0 there and ≥ 0 elsewhere
    Params = TemperatureParams  # kd_ratio, train_on, temperature

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:  # (b, t)
        student, teacher = inputs[GOLD].logits()
        return 0.5 * (forward_kl(student, teacher, params.temperature) + reverse_kl(student, teacher, params.temperature))


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [Jeffreys]
