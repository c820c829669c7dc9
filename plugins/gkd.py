"""gkd — Generalised Knowledge Distillation: the generalised JSD on an on-policy fraction of student samples.

With probability λ (``on_policy_fraction``) a micro-batch's responses are replaced by fresh samples of the
student as it is now (temperature 1), otherwise they are the gold responses (TRL ``GKDTrainer.training_step``):
the ``on_policy`` sequence source, not a branch of the training loop. The teacher runs under teacher forcing
on whatever arrives, and at every response position ``L = JSD_β(p, q)`` exactly as ``jsd`` computes it
(β = 0: ``KL(p‖q)``, β = 1: ``KL(q‖p)``, else ``β·KL(p‖m) + (1 − β)·KL(q‖m)``, ``m = β·p + (1 − β)·q``;
``scaled`` divides by ``β(1 − β)``). λ = 0 is ``jsd`` on gold; λ = 1 is fully on-policy. Like the paper's
students, it starts from the SFT student under the ``paper`` protocol. The runner's CE term stays on gold.
docs/objectives.md, "gkd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.objectives import LossInputs, Need, ObjectiveParams
from kdbench_plugins.jsd import JSD, JSDParams, jsd_loss
from kdbench_plugins.sources import OnPolicy, OnPolicyOptions


@dataclass(frozen=True)
class GKDParams(JSDParams):
    on_policy_fraction: float = 0.5  # λ, TRL's `lmbda` (its default)

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            problems.append(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        return problems


class GKD(JSD):
    name = "gkd"
    summary = "GKD: generalised JSD_β on student samples with probability λ, else on gold"
    paper = ("Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
             "(GKD, arXiv 2306.13649)")
    needs = frozenset({Need.TEACHER_LOGITS, Need.SFT_INIT})
    reads = (OnPolicy.name,)
    Params = GKDParams

    @staticmethod
    def loss(inputs: LossInputs, params: GKDParams) -> torch.Tensor:  # (b, t)
        return jsd_loss(inputs[OnPolicy.name], params)

    @classmethod
    def source_options(cls, params: ObjectiveParams) -> dict[str, OnPolicyOptions]:
        assert isinstance(params, GKDParams)
        return {OnPolicy.name: OnPolicyOptions(params.on_policy_fraction)}


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [GKD]
