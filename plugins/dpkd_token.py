"""dpkd-token — DPKD as the released code computes it (microsoft/LMOps ``dpkd/``), a token-level variant.

No generation. On the gold sequence under teacher forcing, at every response position, with
``y_t = argmax p(·)`` and ``y_s = argmax q(·)``:
``h = [log q(y_t) − log q(y_s)] − [log p(y_t) − log p(y_s)]``, ``ℓ = −log σ(β·h)``, ``β = 0.1``.
Where ``y_t == y_s``, ``h`` is identically 0: the token gives no gradient. METHODS.md, "dpkd-token";
the paper's sequence-level loss is the separate ``dpkd`` objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.objectives import GOLD, LossInputs, Need, Objective, ObjectiveParams


@dataclass(frozen=True)
class DPKDTokenParams(ObjectiveParams):
    beta: float = 0.1

    def check(self) -> list[str]:
        problems = super().check()
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        return problems


def token_preference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """``−log σ(β·h)`` per position, (b, t): the teacher's top token preferred over the student's."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # (b, t, vocab)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)  # (b, t, vocab)
    teacher_top = log_p.argmax(-1, keepdim=True)  # (b, t, 1)
    student_top = log_q.argmax(-1, keepdim=True)  # (b, t, 1)

    def margin(log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs.gather(-1, teacher_top) - log_probs.gather(-1, student_top)).squeeze(-1)  # (b, t)

    return -F.logsigmoid(beta * (margin(log_q) - margin(log_p)))


class DPKDToken(Objective):
    name = "dpkd-token"
    summary = "DPKD as released: token-level preference of the teacher's argmax over the student's (no generation)"
    paper = "Li et al. 2024, Direct Preference Knowledge Distillation (arXiv 2406.19774), released code"
    needs = frozenset({Need.TEACHER_LOGITS})
    Params = DPKDTokenParams

    @staticmethod
    def loss(inputs: LossInputs, params: DPKDTokenParams) -> torch.Tensor:  # (b, t)
        gold = inputs[GOLD]
        assert gold.teacher_logits is not None  # guaranteed by needs
        return token_preference_loss(gold.student_logits, gold.teacher_logits, params.beta)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [DPKDToken]
