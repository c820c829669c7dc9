"""jsd — TRL GKD's generalised Jensen-Shannon divergence on the training sequence.

At every response position, under teacher forcing, with ``m = β·p + (1 − β)·q``:
``L_jsd = β·KL(p‖m) + (1 − β)·KL(q‖m)`` for 0 < β < 1; β = 0 is ``KL(p‖q)`` (forward) and β = 1 is
``KL(q‖p)`` (reverse), as TRL defines the endpoints. Between them the divergence tends to 0 at both ends;
``scaled: true`` divides it by ``β(1 − β)`` so that it tends to the forward KL at 0 and the reverse KL at 1.
Both logits are divided by τ. ``gkd`` is this loss on an on-policy fraction of student samples.
docs/objectives.md, "jsd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import generalized_jsd
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, SequenceView, TemperatureParams


@dataclass(frozen=True)
class JSDParams(TemperatureParams):
    beta: float = 0.5  # TRL's default; 0: forward KL, 1: reverse KL
    scaled: bool = False  # divide by β(1 − β): continuous at the endpoints

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 <= self.beta <= 1.0:
            problems.append(f"beta must be in [0, 1], got {self.beta}")
        return problems


def jsd_loss(view: SequenceView, params: JSDParams) -> torch.Tensor:
    """The divergence at every position of one sequence view. (b, t)"""
    return generalized_jsd(*view.logits(), params.beta, params.scaled, params.temperature)


class JSD(Objective):
    name = "jsd"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "generalised JSD_β to the teacher on the training sequence (TRL GKD's; β=0 forward, β=1 reverse KL)"
    paper = "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, arXiv 2306.13649); TRL's generalized_jsd_loss"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = JSDParams

    @staticmethod
    def loss(inputs: LossInputs, params: JSDParams) -> torch.Tensor:  # (b, t)
        return jsd_loss(inputs[GOLD], params)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [JSD]
