"""The objectives beyond the seed: each loss is its divergence from kdbench.losses on the sequences it reads,
parameters are checked, gkd's on-policy fraction is a sequence source, and opd is a policy gradient."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

from kdbench import losses
from kdbench.config import TrainingConfig
from kdbench.errors import KdbenchError
from kdbench.objectives import GOLD, Need, Objective, SequenceView
from kdbench.registry import load_registries
from kdbench.testing import TinyKit, hand_built_view
from kdbench.train.checkpoints import TrainStats
from kdbench.train.engine import train
from kdbench_plugins.gkd import GKD
from kdbench_plugins.jsd import JSD
from kdbench_plugins.opd import OPD, opd_token_loss
from kdbench_plugins.sources import OnPolicy, OnPolicyOptions

OBJECTIVES = load_registries().objectives

# Each objective reading gold under teacher forcing, its parameters, and the divergence it must equal.
ON_GOLD: dict[str, tuple[dict[str, object], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "rkl": ({"temperature": 2.0}, lambda s, t: losses.reverse_kl(s, t, temperature=2.0)),
    "jsd": ({"beta": 0.3, "scaled": True}, lambda s, t: losses.generalized_jsd(s, t, 0.3, scaled=True)),
    "tvd": ({}, losses.tvd),
    "skl": ({"alpha": 0.2}, lambda s, t: losses.skew_forward_kl(s, t, 0.2)),
    "srkl": ({"alpha": 0.2}, lambda s, t: losses.skew_reverse_kl(s, t, 0.2)),
    "akl": ({"mu": 0.7}, lambda s, t: losses.adaptive_kl(s, t, 0.7)),
    "topk-kd": ({"k": 4, "tail_bucket": False}, lambda s, t: losses.topk_forward_kl(s, t, 4, tail_bucket=False)),
    "abkd": ({"alpha": 0.5, "beta": 0.3}, lambda s, t: losses.alpha_beta_divergence(s, t, 0.5, 0.3)),
}


@pytest.mark.parametrize("name", ON_GOLD)
def test_each_objective_on_gold_is_its_divergence(name: str) -> None:
    values, divergence = ON_GOLD[name]
    objective = OBJECTIVES.get(name)
    view = hand_built_view()
    expected = divergence(*view.logits())
    torch.testing.assert_close(objective.loss({GOLD: view}, objective.make_params(values)), expected)
    assert objective.needs == frozenset({Need.TEACHER_LOGITS}) and objective.reads == (GOLD,)


def test_defaults_follow_methods_md() -> None:
    """α = 0.1 (DistiLLM), μ = 0.5 (AKL), β = λ = 0.5 (TRL's GKD defaults), k1 (opd), (α, β) = (0.2, 0.7)
    (ABKD's GPT-2 scripts), τ = 1, kd_ratio = 0.5."""
    assert OBJECTIVES.get("skl").make_params({}).alpha == OBJECTIVES.get("srkl").make_params({}).alpha == 0.1
    assert OBJECTIVES.get("akl").make_params({}).mu == 0.5
    gkd = GKD.make_params({})
    assert (gkd.beta, gkd.scaled, gkd.on_policy_fraction, gkd.temperature) == (0.5, False, 0.5, 1.0)
    assert OPD.make_params({}).estimator == "k1"
    abkd = OBJECTIVES.get("abkd").make_params({})
    assert (abkd.alpha, abkd.beta) == (0.2, 0.7)
    topk = OBJECTIVES.get("topk-kd").make_params({})
    assert (topk.k, topk.tail_bucket) == (20, True)
    assert all(OBJECTIVES.get(name).make_params({}).kd_ratio == 0.5 for name in [*ON_GOLD, "gkd", "opd"])


@pytest.mark.parametrize("name,values,field", [
    ("jsd", {"beta": 1.5}, "beta"),
    ("gkd", {"on_policy_fraction": -0.1}, "on_policy_fraction"),
    ("skl", {"alpha": 1.0}, "alpha"),
    ("srkl", {"alpha": -0.5}, "alpha"),
    ("akl", {"mu": 0.0}, "mu"),
    ("topk-kd", {"k": 0}, "k"),
    ("opd", {"estimator": "k2"}, "estimator"),
    ("abkd", {"beta": -0.1}, "beta"),
    ("tvd", {"temperature": 0.0}, "temperature"),
])
def test_out_of_range_parameters_are_refused(name: str, values: dict[str, object], field: str) -> None:
    with pytest.raises(KdbenchError, match=field):
        OBJECTIVES.get(name).make_params(values)


def test_gkd_reads_the_on_policy_source_with_its_fraction() -> None:
    params = GKD.make_params({"on_policy_fraction": 0.25, "beta": 0.0})
    assert GKD.reads == (OnPolicy.name,) and Need.SFT_INIT in GKD.needs
    assert GKD.source_options(params) == {OnPolicy.name: OnPolicyOptions(0.25)}
    view = hand_built_view()
    torch.testing.assert_close(GKD.loss({OnPolicy.name: view}, params), losses.forward_kl(*view.logits()))  # β = 0


def _settings(**overrides: object) -> TrainingConfig:
    values: dict = {"engine": "accelerate", "lr": 1e-2, "warmup_steps": 0, "batch_size": 8, "grad_accum": 2, "max_steps": 3,
                    "threads": 1}
    return TrainingConfig(**{**values, **overrides})


def _train(kit: TinyKit, objective: type[Objective], values: dict[str, object]) -> TrainStats:
    _, stats = train(kit.student(), objective, objective.make_params(values), kit.training_data(False), _settings(), 0,
                     kit.teacher())
    return stats


def test_gkd_with_no_on_policy_fraction_is_jsd_on_gold(kdbench_kit: TinyKit) -> None:
    """λ = 0: every micro-batch is gold, so gkd follows jsd's loss trajectory and samples nothing (to float32
    rounding: the two stages' sums were seen to differ in the seventh digit)."""
    gkd, jsd = _train(kdbench_kit, GKD, {"on_policy_fraction": 0.0}), _train(kdbench_kit, JSD, {})
    assert gkd.student_samples == 0
    assert [r["loss"] for r in gkd.log] == pytest.approx([r["loss"] for r in jsd.log], rel=1e-6)


@pytest.mark.parametrize("fraction,sampled", [(1.0, 6), (0.5, None)])
def test_gkd_samples_the_student_for_a_fraction_of_micro_batches(kdbench_kit: TinyKit, fraction: float,
                                                                  sampled: int | None) -> None:
    """λ = 1: all 6 micro-batches (3 steps × 2) are fresh student samples; λ = ½: some, drawn from the stage's
    generator, so the same seed draws the same micro-batches again."""
    runs = [_train(kdbench_kit, GKD, {"on_policy_fraction": fraction}) for _ in range(2)]
    batches = runs[0].student_samples // 8
    assert batches == sampled if sampled is not None else 0 < batches < 6
    assert runs[0].student_samples == runs[1].student_samples
    assert all(math.isfinite(r["loss"]) for r in runs[0].log)


def _sampled_view(seed: int = 0) -> SequenceView:
    view = hand_built_view(seed=seed)
    return dataclasses.replace(view, student_logits=view.student_logits.requires_grad_())


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_opd_value_is_the_estimate_and_its_gradient_the_policy_gradient(estimator: str) -> None:
    """Value: k1 = log q − log p (k3 = r − 1 − log r, r = p/q) at each sampled token; gradient in the student's
    logits: the estimate times ∇ log q(y_t)."""
    view = _sampled_view()
    log_q, log_p = view.student_logp().detach(), view.teacher_logp()
    k1 = log_q - log_p
    expected = k1 if estimator == "k1" else (-k1).exp() - 1 + k1
    loss = opd_token_loss(view, estimator)
    torch.testing.assert_close(loss.detach(), expected * view.mask)
    loss.sum().backward()
    reference = _sampled_view()
    (reference.student_logp() * expected.detach()).sum().backward()
    torch.testing.assert_close(view.student_logits.grad, reference.student_logits.grad)
    if estimator == "k3":
        assert (loss >= 0).all()


def test_opd_trains_on_fresh_student_samples(kdbench_kit: TinyKit) -> None:
    stats = _train(kdbench_kit, OPD, {})
    assert stats.student_samples == 3 * 2 * 8
    assert stats.teacher_forwards == 6
    assert all(math.isfinite(r["loss"]) for r in stats.log)
