"""opd — on-policy distillation with sampled tokens only (Thinking Machines' Tinker cookbook; verl).

The student samples a response to each prompt (``student_samples``); the teacher scores only the sampled
tokens ``y_t``. Per token, the reverse-KL estimate is
``k1 = log q(y_t) − log p(y_t)`` (default), or ``k3 = (r − 1) − log r`` with ``r = p(y_t)/q(y_t)`` (never
negative, lower variance, biased as a gradient). Its negative is the token's advantage in a policy-gradient
update with no discount (each token is rewarded for itself):
``L = sg[k]·exp(log q(y_t) − sg[log q(y_t)])`` — its value is the estimate, its gradient ``k·∇log q(y_t)``.
With fresh samples the estimate's mean over the step is a Monte-Carlo reverse KL; the runner averages over
the sampled tokens. Like the cookbook's students, it starts from the SFT student under the ``paper`` protocol.
docs/objectives.md, "opd".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import Objective, hookimpl
from kdbench.objectives import AtTeacher, LossInputs, Need, ObjectiveParams, SequenceView
from kdbench_plugins.sources import StudentSamples

ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class OPDParams(ObjectiveParams):
    estimator: str = "k1"  # "k1": log q − log p; "k3": (r − 1) − log r, r = p/q

    def check(self) -> list[str]:
        problems = super().check()
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        return problems


def opd_token_loss(samples: SequenceView, estimator: str) -> torch.Tensor:
    """Policy-gradient loss with the per-token reverse-KL estimate as negative advantage, 0 off the mask. (b, t)"""
    student_logp = samples.student_logp()  # log q(y_t), with gradient
    log_ratio = (student_logp - samples.teacher_logp()).detach()  # log q/p at the sampled token
    estimate = log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio
    return estimate * torch.exp(student_logp - student_logp.detach())  # value: the estimate; gradient: estimate·∇log q


class OPD(Objective):
    name = "opd"
    summary = "on-policy distillation: student samples, per-token reverse-KL estimate log q − log p as negative advantage"
    paper = "Lu & Thinking Machines Lab 2025, On-Policy Distillation (Tinker cookbook); Agarwal et al. 2024 (arXiv 2306.13649)"
    needs = frozenset({Need.TEACHER_LOGITS, Need.SFT_INIT})
    reads = (StudentSamples.name,)  # averaged over the sampled response tokens of the step
    at_teacher = AtTeacher.STATIONARY  # a sampled estimate: zero gradient at q = p, not a minimum per sample
    Params = OPDParams

    @staticmethod
    def loss(inputs: LossInputs, params: OPDParams) -> torch.Tensor:  # (b, t)
        return opd_token_loss(inputs[StudentSamples.name], params.estimator)


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [OPD]
