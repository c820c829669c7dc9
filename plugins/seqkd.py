"""seqkd — sequence-level KD (Kim & Rush 2016, arXiv 1606.07947).

The teacher samples one response per training prompt once (temperature 1, top-p 1, top-k 0, a
max-new-tokens bound); the runner stores and reuses them. The objective is cross-entropy on the
teacher's response instead of the gold one. With ``word_kd`` (as in the released MiniLLM scripts)
word-level KD on the teacher text joins it: ``½·CE(ŷ) + ½·Σ_v p(v)·(−log q(v))`` on ŷ. METHODS.md, "seqkd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import hookimpl
from kdbench.objectives import LossInputs, Need, Objective, ObjectiveParams, gold_cross_entropy
from kdbench_plugins.kd import soft_cross_entropy


@dataclass(frozen=True)
class SeqKDParams(ObjectiveParams):
    word_kd: bool = False
    temperature: float = 1.0  # of the word-level KD term only

    def check(self) -> list[str]:
        problems = super().check()
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        return problems


class SeqKD(Objective):
    name = "seqkd"
    summary = "sequence-level KD: cross-entropy on stored teacher samples (option: plus word-level KD on them)"
    paper = "Kim & Rush 2016, Sequence-Level Knowledge Distillation (arXiv 1606.07947)"
    reads = ("teacher_text",)
    Params = SeqKDParams

    @classmethod
    def needs_for(cls, params: ObjectiveParams) -> frozenset[Need]:
        assert isinstance(params, SeqKDParams)
        return cls.needs | {Need.TEACHER_LOGITS} if params.word_kd else cls.needs

    @staticmethod
    def loss(inputs: LossInputs, params: SeqKDParams) -> torch.Tensor:  # (b, t)
        text = inputs["teacher_text"]  # its labels are the teacher's sampled tokens
        ce = gold_cross_entropy(text.student_logits, text.labels, text.mask)
        if not params.word_kd:
            return ce
        assert text.teacher_logits is not None  # needs_for asks for them
        return 0.5 * ce + 0.5 * soft_cross_entropy(text.student_logits, text.teacher_logits, params.temperature)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [SeqKD]
