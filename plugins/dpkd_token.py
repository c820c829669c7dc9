"""dpkd-token — DPKD as the released code computes it (microsoft/LMOps ``dpkd/``), a token-level variant.

No generation. On the training sequence (``GOLD``: the data set's responses, or the teacher's samples
with ``train_on: teacher_text``) under teacher forcing, at every response position, with
``y_t = argmax p(·)`` and ``y_s = argmax q(·)``:
``h = [log q(y_t) − log q(y_s)] − [log p(y_t) − log p(y_s)]``, ``ℓ = −log σ(β·h)``, ``β = 0.1``.
Where ``y_t == y_s``, ``h`` is identically 0: the token gives no gradient. The log-softmax runs in
``logsoftmax_dtype``: float32 by default (as every kdbench loss, so ``uniform`` compares objectives, not
precisions); the released code's is bfloat16 (its models run in bf16).

The released recipe (``paper`` protocol; ``dpkd/scripts/dpkd-gpt2_base_runner.sh:20,25``) starts from
the SFT student (``Need.SFT_INIT``) and trains on the teacher's pseudo data, 30 epochs, with
``½·CE + ½·L_token`` both on it::

    dpkd-token: {kd_ratio: 0.5, train_on: teacher_text, beta: 0.1, logsoftmax_dtype: bfloat16}

(its pre-training term is the protocol's, not this objective's). docs/objectives.md, "dpkd-token"; the paper's
sequence-level loss is the separate ``dpkd`` objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench import Objective, hookimpl
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, ObjectiveParams

LOGSOFTMAX_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DPKDTokenParams(ObjectiveParams):
    beta: float = 0.1
    logsoftmax_dtype: str = "float32"  # "bfloat16" as the released code computes it

    def check(self) -> list[str]:
        problems = super().check()
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.logsoftmax_dtype not in LOGSOFTMAX_DTYPES:
            problems.append(f"logsoftmax_dtype must be one of {sorted(LOGSOFTMAX_DTYPES)}, got {self.logsoftmax_dtype!r}")
        return problems


def token_preference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``−log σ(β·h)`` per position, (b, t), in float32: the teacher's top token preferred over the
    student's, with both log-softmaxes (and so the argmaxes and margins) taken in ``dtype``."""
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)  # (b, t, vocab)
    log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1)  # (b, t, vocab)
    teacher_top = log_p.argmax(-1, keepdim=True)  # (b, t, 1)
    student_top = log_q.argmax(-1, keepdim=True)  # (b, t, 1)

    def margin(log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs.gather(-1, teacher_top) - log_probs.gather(-1, student_top)).squeeze(-1)  # (b, t)

    return -F.logsigmoid(beta * (margin(log_q) - margin(log_p)).float())


class DPKDToken(Objective):
    name = "dpkd-token"
    summary = "DPKD as released: token-level preference of the teacher's argmax over the student's (no generation)"
    paper = "Li et al. 2024, Direct Preference Knowledge Distillation (arXiv 2406.19774), released code"
    needs = frozenset({Need.TEACHER_LOGITS, Need.SFT_INIT})  # SFT init: the released runner's (paper protocol)
    at_teacher = AtTeacher.MINIMUM  # log 2 there: both argmaxes agree, so h ≡ 0
    gradient_can_vanish = ("h ≡ 0 wherever the student's argmax is the teacher's, so a student that agrees with "
                           "the teacher on every response token gets no gradient from the term")
    Params = DPKDTokenParams

    @staticmethod
    def loss(inputs: LossInputs, params: DPKDTokenParams) -> torch.Tensor:  # (b, t)
        text = inputs[GOLD]  # the sequences train_on names
        assert text.teacher_logits is not None  # guaranteed by needs
        return token_preference_loss(text.student_logits, text.teacher_logits, params.beta,
                                     LOGSOFTMAX_DTYPES[params.logsoftmax_dtype])


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [DPKDToken]
