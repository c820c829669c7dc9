"""sft — supervised fine-tuning on the gold response, no distillation.

Token-mean cross-entropy on the response (docs/objectives.md, "sft"). It makes the teacher, initialises the
students of methods that start from SFT, and is the baseline row of every leaderboard. By
definition ``kd_ratio = 0``: the loss is exactly the runner's gold cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.objectives import GOLD, LossInputs, ObjectiveParams, gold_cross_entropy


@dataclass(frozen=True)
class SFTParams(ObjectiveParams):
    kd_ratio: float = 0.0

    def check(self) -> list[str]:
        return [] if self.kd_ratio == 0.0 else [f"kd_ratio of sft is 0 by definition, got {self.kd_ratio}"]


class SFT(Objective):
    name = "sft"
    fused_head = True  # its loss reads logits through kdbench.losses only
    summary = "fine-tuning on gold responses (cross-entropy), no teacher"
    paper = "baseline of MiniLLM (arXiv 2306.08543) and DPKD (arXiv 2406.19774)"
    Params = SFTParams

    @staticmethod
    def loss(inputs: LossInputs, params: SFTParams) -> torch.Tensor:
        gold = inputs[GOLD]
        return gold_cross_entropy(gold.student_logits, gold.labels, gold.mask)  # (b, t)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [SFT]
