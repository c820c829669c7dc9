"""MiniLLM's parts on hand-built tensors, and the teacher-mixed sampler on real tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdbench.contracts import Sequences
from kdbench.data import TEMPLATE_PIECES
from kdbench.errors import KdbenchError
from kdbench.objectives import Need, Reduction
from kdbench.train.generation import positions_from_mask, sample_mixture
from kdbench.train.sources import forward_logits
from kdbench.zoo import TinyArch, build_tiny_model, load_model, load_tokenizer, train_tokenizer
from kdbench_plugins.families import GPT2, OPT
from kdbench_plugins.minillm import MiniLLM, RolloutInputs, discounted_advantages, minillm_token_loss
from kdbench_plugins.sources import Rollouts


def test_advantage_is_the_discounted_length_normalised_sum_by_hand() -> None:
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])  # a prompt token, three response tokens, padding
    gamma = 0.5
    want = [0.0, (1 + 0.5 * 2 + 0.25 * 3) / 3, (2 + 0.5 * 3) / 2, 3 / 1, 0.0]
    got = discounted_advantages(rewards, mask, gamma, length_normalized=True)
    torch.testing.assert_close(got, torch.tensor([want]))
    unnormalised = discounted_advantages(rewards, mask, gamma, length_normalized=False)
    torch.testing.assert_close(unnormalised, torch.tensor([[0.0, 2.75, 3.5, 3.0, 0.0]]))


def _inputs(old_logp: torch.Tensor, mixture_logp: torch.Tensor, student_logits: torch.Tensor | None = None) -> RolloutInputs:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6) if student_logits is None else student_logits
    actions = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, False]])
    teacher_logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    return RolloutInputs(logits, torch.randn(1, 4, 6), actions, mask, old_logp, teacher_logp, mixture_logp)


def test_importance_weight_is_one_when_nothing_is_mixed_in() -> None:
    """At α = 0 the sampler's mixture log-prob is the student's, so w = q_old / mix = 1 and switching
    the weight off changes nothing; with a mixture it does."""
    params = MiniLLM.make_params({"single_step": False})
    logits = torch.randn(1, 4, 6)
    old = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[1, 2, 3, 0]]).unsqueeze(-1)).squeeze(-1)
    with_weight = minillm_token_loss(_inputs(old, old.clone(), logits), params)
    no_weight = minillm_token_loss(_inputs(old, old.clone(), logits), MiniLLM.make_params(
        {"single_step": False, "importance_weight": False}))
    torch.testing.assert_close(with_weight, no_weight)
    mixed = minillm_token_loss(_inputs(old, old - 0.3, logits), params)  # mix(y) > q_old(y): w < 1
    assert not torch.allclose(mixed, with_weight)


def test_on_policy_loss_is_minus_whitened_advantage_plus_reverse_kl() -> None:
    """First inner epoch: log q = log q_old, so ratio = 1 and the clip is inactive."""
    inputs = _inputs(torch.zeros(1, 4), torch.zeros(1, 4))
    log_q = torch.log_softmax(inputs.student_logits, -1)
    old = log_q.gather(-1, inputs.actions.unsqueeze(-1)).squeeze(-1)
    inputs = RolloutInputs(inputs.student_logits, inputs.teacher_logits, inputs.actions, inputs.mask, old,
                           inputs.teacher_logp, old)
    params = MiniLLM.make_params({})
    mask = inputs.mask.float()
    rewards = ((inputs.teacher_logp - old) / 0.5).clamp(-100, 100)
    adv = discounted_advantages(rewards, mask, 0.95, True)
    selected = adv[inputs.mask]
    adv = (adv - selected.mean()) / (selected.std() + 1e-8) * mask
    log_p = torch.log_softmax(inputs.teacher_logits, -1)
    reverse_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(minillm_token_loss(inputs, params), (-adv + reverse_kl) * mask)


def test_ppo_clip_caps_the_incentive_of_a_large_ratio() -> None:
    params = MiniLLM.make_params({"single_step": False, "whiten": False, "importance_weight": False})
    logits = torch.zeros(1, 4, 6)
    old = torch.full((1, 4), math.log(1 / 6) - 1.0)  # ratio = e ≈ 2.7 on every token
    inputs = _inputs(old, old, logits)
    clipped = minillm_token_loss(inputs, params)
    unclipped = minillm_token_loss(inputs, MiniLLM.make_params(
        {"single_step": False, "whiten": False, "importance_weight": False, "ppo_clip": 0.0}))
    positive = clipped[inputs.mask] < 0  # tokens with positive advantage: the clipped loss is higher
    assert positive.any()
    assert (clipped[inputs.mask][positive] > unclipped[inputs.mask][positive]).all()


def test_declares_rollouts_and_checks_parameters() -> None:
    params = MiniLLM.make_params({"rollout_batches": 3})
    assert MiniLLM.needs_for(params) == {Need.TEACHER_LOGITS, Need.SFT_INIT}
    assert MiniLLM.reads == ("rollouts",) and MiniLLM.reduction is Reduction.TOKEN
    options = MiniLLM.source_options(params)["rollouts"]
    assert isinstance(options, Rollouts.Options) and (options.teacher_mix, options.batches, options.inner_epochs) == (
        0.2, 3, 4)
    assert Need.TEACHER_MODEL in Rollouts.needs and Rollouts.drives_prompts and Rollouts.samples_student
    for bad in ({"teacher_mix": 1.0}, {"gamma": 0.0}, {"ppo_clip": 1.5}, {"inner_epochs": 0}):
        with pytest.raises(KdbenchError):
            MiniLLM.make_params(bad)


@pytest.mark.parametrize("alpha", [0.2, 0.0], ids=["teacher-mixed", "student only"])
@pytest.mark.parametrize("family", [GPT2, OPT])
def test_mixture_sampler_records_the_probabilities_a_full_forward_gives(family: object, alpha: float,
                                                                        tmp_path: Path) -> None:
    """KV-cached, left-padded sampling: each recorded log q_old(y_t) and log p(y_t) equals what one
    full forward pass over the finished rollout gives, and the mixture is (1−α)·q + α·p (with α = 0 the teacher
    runs once, after sampling)."""
    texts = [f"### Response:\n{w} {n}" for n in range(60) for w in ("apple", "pear", "oak")]
    train_tokenizer(texts, 300, tmp_path / "tok", TEMPLATE_PIECES)
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    build_tiny_model(family, TinyArch(16, 1, 1), tokenizer, 64, 0, tmp_path / "student")
    build_tiny_model(family, TinyArch(32, 2, 2), tokenizer, 64, 1, tmp_path / "teacher")
    student, teacher = load_model(str(tmp_path / "student")), load_model(str(tmp_path / "teacher"))
    prompts = [tokenizer(t)["input_ids"] for t in ("apple 1", "### Response:\npear 22 oak", "oak")]
    rollout = sample_mixture(student, teacher, prompts, alpha, 8, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             torch.Generator().manual_seed(0))
    batch = Sequences(rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                      positions_from_mask(rollout.attention_mask))
    actions = rollout.input_ids[:, 1:].unsqueeze(-1)
    with torch.no_grad():
        log_q = torch.log_softmax(forward_logits(student, batch), -1).gather(-1, actions).squeeze(-1)
        log_p = torch.log_softmax(forward_logits(teacher, batch), -1).gather(-1, actions).squeeze(-1)
    mask = rollout.response_mask
    assert mask.sum() > 0 and mask[:, : max(len(p) for p in prompts) - 1].sum() == 0
    torch.testing.assert_close(rollout.student_logp[mask], log_q[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rollout.teacher_logp[mask], log_p[mask], rtol=1e-4, atol=1e-4)
    mix = torch.log((1 - alpha) * log_q.exp() + alpha * log_p.exp())
    torch.testing.assert_close(rollout.mixture_logp[mask], mix[mask], rtol=1e-4, atol=1e-4)
