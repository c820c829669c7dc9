"""topk-kd — forward KL on the teacher's top-k tokens, with the rest of the vocabulary in one tail bucket.

What a cached or served teacher can give: its k most likely tokens and their log-probabilities. At every
response position of the training sequence, with ``K`` the teacher's top k tokens, ``p_tail = 1 − Σ_K p``
and ``q_tail = 1 − Σ_K q``:
``L = Σ_{v∈K} p(v)·(log p(v) − log q(v)) + p_tail·(log p_tail − log q_tail)``, the KL between the two
(k + 1)-bucket distributions (TRL's ServerDistillation ``loss_add_tail``; DistillKit's
``missing_probability_handling``). Equal to the forward KL when k is the vocabulary size. With
``tail_bucket: false``, the KL between both distributions renormalised over K. Both logits divided by τ.
docs/objectives.md, "topk-kd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import topk_forward_kl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, TemperatureParams


@dataclass(frozen=True)
class TopKParams(TemperatureParams):
    k: int = 20  # the number of log-probabilities serving APIs commonly return per position
    tail_bucket: bool = True

    def check(self) -> list[str]:
        problems = super().check()
        if self.k < 1:
            problems.append(f"k must be ≥ 1, got {self.k}")
        return problems


class TopKKD(Objective):
    name = "topk-kd"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "forward KL on the teacher's top-k tokens plus one tail bucket (what a served teacher gives), k = 20"
    paper = "top-k logit distillation with a tail bucket: TRL ServerDistillation (loss_add_tail), DistillKit"
    needs = frozenset({Need.TEACHER_LOGITS})
    at_teacher = AtTeacher.ZERO
    Params = TopKParams

    @staticmethod
    def loss(inputs: LossInputs, params: TopKParams) -> torch.Tensor:  # (b, t)
        return topk_forward_kl(*inputs[GOLD].logits(), params.k, params.tail_bucket, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [TopKKD]
