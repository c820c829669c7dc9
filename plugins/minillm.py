"""minillm — reverse KL by policy gradient (Gu et al. 2024, MiniLLM, arXiv 2306.08543).

Rollouts are sampled from the teacher-mixed distribution ``(1 − α)·q_θ + α·p`` (α = 0.2); the runner
stores per token ``log q_old``, ``log p`` and the mixture probability, and reuses each collection for
``inner_epochs`` passes. Per sampled token:

* reward ``r_t = clip((log p(y_t) − log q_old(y_t)) / 0.5, ±100)``;
* single-step importance weight of the mixture ``w_t = q_old(y_t) / mix(y_t)`` (this step only);
* advantage ``A_t = Σ_{k≥t} γ^{k−t}·r_k / (T − t)`` (γ = 0.95, length-normalised), whitened;
* PPO clip: ``ratio = exp(log q_θ − log q_old)·w_t``, ``max(−A_t·ratio, −A_t·clip(ratio, 1 ± 0.2))``;
* plus the single-step term, the exact reverse KL ``Σ_v q_θ(v)·(log q_θ(v) − log p(v))``.

As in the released code, the policy trains in eval mode (no dropout, ``minillm/minillm/model.py:14``;
``train_mode``) and, with ``recompute_logp`` (default), ``log q_old``, ``log p`` and the mixture are
recomputed after sampling by full forward passes (``sampler.py:105-115``), so the ratio is exactly 1 at
the first inner step.

The language-modelling term is the runner's gold cross-entropy through ``kd_ratio``. Each part can be
switched off, to reproduce the paper's ablation (full 24.6; no length norm 14.7; no teacher-mixed
sampling 20.4; no single-step term 23.7 on GPT-2 120M, Dolly). docs/objectives.md, "minillm".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench import Objective, hookimpl
from kdbench.objectives import AtTeacher, LossInputs, Need, ObjectiveParams, SequenceView
from kdbench_plugins.sources import RolloutOptions


@dataclass(frozen=True)
class MiniLLMParams(ObjectiveParams):
    teacher_mix: float = 0.2  # α of the sampling mixture; 0 switches teacher-mixed sampling off
    gamma: float = 0.95
    reward_scale: float = 0.5
    reward_clip: float = 100.0
    ppo_clip: float = 0.2  # 0 switches clipping off
    length_normalized: bool = True
    importance_weight: bool = True
    single_step: bool = True
    whiten: bool = True
    inner_epochs: int = 4
    rollout_batches: int = 4  # micro-batches of prompts per collection
    recompute_logp: bool = True  # full forward passes after sampling, as released; False keeps the sampler's

    def check(self) -> list[str]:
        problems = super().check()
        if not 0.0 <= self.teacher_mix < 1.0:
            problems.append(f"teacher_mix must be in [0, 1), got {self.teacher_mix}")
        if not 0.0 < self.gamma <= 1.0:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if not self.reward_scale > 0 or not self.reward_clip > 0:
            problems.append("reward_scale and reward_clip must be > 0")
        if not 0.0 <= self.ppo_clip < 1.0:
            problems.append(f"ppo_clip must be in [0, 1), got {self.ppo_clip}")
        if self.inner_epochs < 1 or self.rollout_batches < 1:
            problems.append("inner_epochs and rollout_batches must be ≥ 1")
        return problems


@dataclass(frozen=True)
class RolloutInputs:
    """Rollout tensors aligned so position ``i`` holds the sampled token ``i + 1``; all (b, t) unless noted."""

    student_logits: torch.Tensor  # (b, t, vocab) the student being trained
    teacher_logits: torch.Tensor  # (b, t, vocab)
    actions: torch.Tensor  # sampled token ids
    mask: torch.Tensor  # bool: sampled response tokens (through EOS)
    old_logp: torch.Tensor  # log q_old(y_t) of the student that sampled
    teacher_logp: torch.Tensor  # log p(y_t)
    mixture_logp: torch.Tensor  # log of the sampling distribution at y_t

    @classmethod
    def from_view(cls, view: SequenceView) -> RolloutInputs:
        """The view of the ``rollouts`` source, whose extras are the per-token log-probabilities it recorded."""
        assert view.teacher_logits is not None  # MiniLLM needs teacher logits
        return cls(view.student_logits, view.teacher_logits, view.labels, view.mask, view.extras["old_logp"],
                   view.extras["teacher_logp"], view.extras["mixture_logp"])


def discounted_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                          length_normalized: bool) -> torch.Tensor:
    """``Σ_{k≥t} γ^{k−t}·r_k`` over each row's response tokens, divided by the ``T − t`` tokens from t
    to the end when length-normalised; 0 off the mask. (b, t)"""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):  # right to left
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    if length_normalized:
        remaining = mask.flip(-1).cumsum(-1).flip(-1).clamp(min=1)  # tokens from t to the end
        returns = returns / remaining
    return returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the batch's response tokens."""
    selected = values[mask]
    if selected.numel() < 2:
        return values * mask
    return (values - selected.mean()) / (selected.std() + 1e-8) * mask


def minillm_token_loss(inputs: RolloutInputs, params: MiniLLMParams) -> torch.Tensor:
    """Policy-gradient (+ single-step reverse KL) loss at every rollout position, (b, t)."""
    mask = inputs.mask.float()
    log_q_all = F.log_softmax(inputs.student_logits.float(), dim=-1)  # (b, t, vocab)
    log_q = log_q_all.gather(-1, inputs.actions.unsqueeze(-1)).squeeze(-1)  # (b, t)
    rewards = ((inputs.teacher_logp - inputs.old_logp) / params.reward_scale).clamp(-params.reward_clip,
                                                                                      params.reward_clip)
    advantages = discounted_advantages(rewards, mask, params.gamma, params.length_normalized)
    if params.whiten:
        advantages = whiten(advantages, inputs.mask)
    ratio = torch.exp(log_q - inputs.old_logp)
    if params.importance_weight:
        ratio = ratio * torch.exp(inputs.old_logp - inputs.mixture_logp)  # w_t = q_old / mix
    loss = -advantages * ratio
    if params.ppo_clip > 0:
        loss = torch.maximum(loss, -advantages * ratio.clamp(1 - params.ppo_clip, 1 + params.ppo_clip))
    if params.single_step:
        log_p_all = F.log_softmax(inputs.teacher_logits.float(), dim=-1)
        loss = loss + (log_q_all.exp() * (log_q_all - log_p_all)).sum(-1)  # exact reverse KL at t
    return loss * mask


class MiniLLM(Objective):
    name = "minillm"
    summary = "MiniLLM: reverse KL by policy gradient on teacher-mixed rollouts, PPO clip, single-step term"
    paper = "Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models (arXiv 2306.08543)"
    version = 2  # 2: eval mode; log-probabilities recomputed after sampling
    needs = frozenset({Need.TEACHER_LOGITS, Need.SFT_INIT})
    reads = ("rollouts",)  # averaged over the rollout tokens of the step
    at_teacher = AtTeacher.MINIMUM  # zero rewards and advantages there; the single-step reverse KL is minimal
    Params = MiniLLMParams

    @classmethod
    def train_mode(cls, params: ObjectiveParams) -> bool:
        return False  # the policy samples and updates without dropout, as released

    @staticmethod
    def loss(inputs: LossInputs, params: MiniLLMParams) -> torch.Tensor:  # (b, t)
        return minillm_token_loss(RolloutInputs.from_view(inputs["rollouts"]), params)

    @classmethod
    def source_options(cls, params: ObjectiveParams) -> dict[str, RolloutOptions]:
        assert isinstance(params, MiniLLMParams)
        return {"rollouts": RolloutOptions(params.teacher_mix, params.rollout_batches, params.inner_epochs,
                                           params.recompute_logp)}


@hookimpl
def kdbench_register_objectives() -> list[type[Objective]]:
    return [MiniLLM]
