"""srkl — DistiLLM's skew reverse KL divergence (Ko et al. 2024, arXiv 2402.03898).

At every response position of the training sequence, under teacher forcing:
``L_srkl = KL(q ‖ α·q + (1 − α)·p)``, α = 0.1, both logits divided by τ; α = 0 is the reverse KL.
docs/objectives.md, "srkl"; ``skl`` is the forward counterpart.
"""

from __future__ import annotations

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import skew_reverse_kl
from kdbench.objectives import GOLD, LossInputs
from kdbench_plugins.skl import SkewKL, SkewParams


class SkewReverseKL(SkewKL):
    name = "srkl"
    summary = "DistiLLM skew reverse KL: KL(q ‖ α·q + (1−α)·p) on the training sequence, α = 0.1"

    @staticmethod
    def loss(inputs: LossInputs, params: SkewParams) -> torch.Tensor:  # (b, t)
        return skew_reverse_kl(*inputs[GOLD].logits(), params.alpha, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [SkewReverseKL]
