"""seqkd — sequence-level KD (Kim & Rush 2016, arXiv 1606.07947).

The teacher samples one response per training prompt once (temperature 1, top-p 1, top-k 0, a
max-new-tokens bound); the runner stores and reuses them. The objective is cross-entropy on the
teacher's response ŷ instead of the gold one. With ``word_kd`` word-level KD on the teacher text joins
it: ``(1 − w)·CE(ŷ) + w·Σ_v p(v)·(−log q(v))`` on ŷ, ``w = word_kd_weight`` (½).

Under ``uniform`` the runner adds ``(1 − kd_ratio)·CE_gold``. MiniLLM's SeqKD baseline (``paper``
protocol; ``minillm/scripts/gpt2/seqkd/seqkd_base.sh``: ``--type kd`` on teacher text, no gold) is
``½·CE(ŷ) + ½·word-KD(ŷ)``: the runner's CE term moved onto the teacher text (``train_on``), and
this objective's term pure word-KD::

    seqkd: {kd_ratio: 0.5, train_on: teacher_text, word_kd: true, word_kd_weight: 1.0}

docs/objectives.md, "seqkd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.losses import soft_cross_entropy
from kdbench.objectives import LossInputs, Need, ObjectiveParams, TemperatureParams, gold_cross_entropy


@dataclass(frozen=True)
class SeqKDParams(TemperatureParams):
    """The temperature is the word-level KD term's only."""

    word_kd: bool = False
    word_kd_weight: float = 0.5  # w of (1 − w)·CE(ŷ) + w·word-KD(ŷ) when word_kd; 1 leaves the CE to train_on

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 <= self.word_kd_weight <= 1.0:
            problems.append(f"word_kd_weight must be in [0, 1], got {self.word_kd_weight}")
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
        kd = soft_cross_entropy(text.student_logits, text.teacher_logits, params.temperature)
        return (1 - params.word_kd_weight) * ce + params.word_kd_weight * kd


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [SeqKD]
