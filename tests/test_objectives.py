"""Objectives: the kd soft cross-entropy, the gold CE, the kd_ratio mix, and parameter checking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.objectives import GOLD, ObjectiveParams, SequenceView, gold_cross_entropy, masked_loss_sum, soft_cross_entropy
from kdbench_plugins.kd import KD, KDParams
from kdbench_plugins.sft import SFT

B, T, V = 2, 3, 7


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    """Random (B, T, V) float64 logits from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=generator, dtype=torch.float64) * scale


def _labels_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with -100 and an out-of-range id at the masked-out positions, and the bool mask."""
    mask = torch.tensor([[False, True, True], [True, True, False]])
    labels = torch.tensor([[-100, 3, 6], [0, 5, V + 100]])
    return labels, mask


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy H(p) of softmax(logits), (b, t)."""
    log_p = F.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


# -- soft cross-entropy / kd -----------------------------------------------------------------------

def test_soft_cross_entropy_is_forward_kl_plus_teacher_entropy() -> None:
    """Per position: Σ p·(−log q) = KL(p‖q) + H(p), with KL from torch's kl_div."""
    student, teacher = _logits(0), _logits(1)
    got = soft_cross_entropy(student, teacher)
    assert got.shape == (B, T)
    log_q = F.log_softmax(student.double(), dim=-1)
    log_p = F.log_softmax(teacher.double(), dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p‖q) per position
    expected = kl + _entropy(teacher)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # The KL part is not trivially zero here, so the check distinguishes CE from H(p) alone.
    assert (kl > 1e-3).all()


def test_kd_loss_minimised_at_teacher_logits_with_zero_gradient() -> None:
    """With q = p the loss equals H(p), its gradient w.r.t. the student is ~0, and a perturbation raises it."""
    teacher = _logits(2)
    student = teacher.clone().requires_grad_(True)
    loss = soft_cross_entropy(student, teacher)
    torch.testing.assert_close(loss.double(), _entropy(teacher), rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert student.grad is not None
    assert student.grad.abs().max().item() < 1e-5

    for seed in range(3):
        noise = torch.randn(B, T, V, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        perturbed = soft_cross_entropy(teacher + 0.5 * noise, teacher)
        assert (perturbed > loss.detach() + 1e-6).all()


def test_kd_gradient_is_q_minus_p_away_from_optimum() -> None:
    """d/dz_q Σ p·(−log q) = q − p: a non-zero gradient where the student differs from the teacher."""
    teacher = _logits(3)
    student = _logits(4).requires_grad_(True)
    soft_cross_entropy(student, teacher).sum().backward()
    expected = F.softmax(student.detach(), -1) - F.softmax(teacher, -1)
    assert student.grad is not None
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_temperature_divides_both_logits() -> None:
    """At τ = 2 the loss is Σ softmax(t/2)·(−log_softmax(s/2)), unlike the τ = 1 value."""
    student, teacher = _logits(5), _logits(6)
    got = soft_cross_entropy(student, teacher, temperature=2.0)
    p = torch.softmax(teacher / 2.0, dim=-1)
    log_q = torch.log_softmax(student / 2.0, dim=-1)
    expected = -(p * log_q).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, soft_cross_entropy(student, teacher, temperature=1.0))


def test_kd_loss_uses_params_temperature() -> None:
    """KD.loss reads the temperature from its params."""
    student, teacher = _logits(7), _logits(8)
    labels, mask = _labels_and_mask()
    inputs = {GOLD: SequenceView(student, labels, mask, teacher_logits=teacher)}
    got = KD.loss(inputs, KDParams(temperature=2.0))
    torch.testing.assert_close(got, soft_cross_entropy(student, teacher, 2.0))


def test_soft_cross_entropy_hand_computed() -> None:
    """p = [.5, .5, 0], q = [.25, .25, .5]: −(.5·ln .25 + .5·ln .25) = ln 4."""
    teacher = torch.log(torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64))  # last logit is −inf
    student = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64))
    got = soft_cross_entropy(student, teacher)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(math.log(4.0), rel=1e-6)
    # And its forward-KL part: KL = ln 4 − H(p) = ln 4 − ln 2 = ln 2.
    assert got.item() - math.log(2.0) == pytest.approx(math.log(2.0), rel=1e-6)


# -- gold cross-entropy and the kd_ratio mix -------------------------------------------------------

def test_gold_cross_entropy_matches_torch_inside_mask_and_is_zero_outside() -> None:
    """Equal to F.cross_entropy(reduction='none') where masked in, 0 where masked out (labels -100 or too large)."""
    student = _logits(9)
    labels, mask = _labels_and_mask()
    got = gold_cross_entropy(student, labels, mask)
    assert got.shape == (B, T)
    reference = F.cross_entropy(student.reshape(-1, V), labels.clamp(0, V - 1).reshape(-1), reduction="none").reshape(B, T)
    torch.testing.assert_close(got[mask].double(), reference[mask].double(), rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all()
    assert (got[mask] > 0).all()


def _kd_inputs() -> SequenceView:
    """A batch with teacher logits and a partial mask."""
    labels, mask = _labels_and_mask()
    return SequenceView(_logits(10), labels, mask, teacher_logits=_logits(11))


def test_masked_loss_sum_is_the_objective_summed_inside_the_mask_only() -> None:
    """The runner's masking: the objective's own value at response positions, exactly 0 elsewhere
    (even where the unmasked value would be NaN, e.g. padding with -inf logits)."""
    view = _kd_inputs()
    assert view.teacher_logits is not None
    poisoned = view.teacher_logits.clone()
    poisoned[~view.mask] = float("nan")
    view = SequenceView(view.student_logits, view.labels, view.mask, poisoned)
    got = masked_loss_sum(KD, {GOLD: view}, KDParams())
    expected = soft_cross_entropy(view.student_logits, poisoned)[view.mask].sum()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected)

def test_sft_token_loss_is_gold_ce_and_default_params() -> None:
    """SFT's loss is the gold CE; its kd_ratio defaults to 0 and may not be set to anything else."""
    view = _kd_inputs()
    torch.testing.assert_close(SFT.loss({GOLD: view}, SFT.make_params({})),
                               gold_cross_entropy(view.student_logits, view.labels, view.mask))
    assert SFT.make_params({}).kd_ratio == 0.0
    with pytest.raises(KdbenchError, match="kd_ratio"):
        SFT.make_params({"kd_ratio": 0.5})


# -- parameters ------------------------------------------------------------------------------------

def test_kd_default_params() -> None:
    """Defaults are kd_ratio 0.5 and temperature 1 (docs/objectives.md, "kd")."""
    params = KD.make_params({})
    assert isinstance(params, KDParams)
    assert (params.kd_ratio, params.temperature) == (0.5, 1.0)


def test_unknown_parameter_suggests_close_name() -> None:
    """A near-miss key is rejected with a 'did you mean' hint and the given path prefix."""
    with pytest.raises(KdbenchError) as info:
        KD.make_params({"temprature": 2.0}, where="methods.kd.")
    message = str(info.value)
    assert "did you mean 'temperature'" in message
    assert "methods.kd.temprature" in message


def test_every_parameter_problem_is_reported_at_once() -> None:
    """An unknown key and a wrongly typed value appear in one error."""
    with pytest.raises(KdbenchError) as info:
        KD.make_params({"temprature": 2.0, "kd_ratio": "half"})
    assert "temprature" in str(info.value) and "kd_ratio" in str(info.value)


@pytest.mark.parametrize("values", [
    {"temperature": "2"},
    {"kd_ratio": "0.5"},
    {"temperature": True},
    {"kd_ratio": None},
])
def test_wrong_type_is_rejected(values: dict[str, object]) -> None:
    """Strings, booleans and null for float fields are errors, not silently coerced."""
    with pytest.raises(KdbenchError, match="expected float"):
        KD.make_params(values)


@pytest.mark.parametrize("values,field", [
    ({"kd_ratio": 1.5}, "kd_ratio"),
    ({"kd_ratio": -0.1}, "kd_ratio"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
])
def test_out_of_range_values_are_rejected(values: dict[str, object], field: str) -> None:
    """kd_ratio outside [0, 1] and temperature ≤ 0 are errors naming the field."""
    with pytest.raises(KdbenchError, match=field):
        KD.make_params(values)


def test_int_for_float_field_is_accepted_as_float() -> None:
    """temperature: 2 (a YAML int) becomes 2.0; kd_ratio: 1 becomes 1.0."""
    params = KD.make_params({"temperature": 2, "kd_ratio": 1})
    assert params.temperature == 2.0 and isinstance(params.temperature, float)
    assert params.kd_ratio == 1.0 and isinstance(params.kd_ratio, float)


def test_base_params_check() -> None:
    """ObjectiveParams.check flags kd_ratio outside [0, 1] only."""
    assert ObjectiveParams(0.0).check() == [] and ObjectiveParams(1.0).check() == []
    assert len(ObjectiveParams(1.01).check()) == 1


def test_nan_temperature_is_rejected() -> None:
    """A NaN temperature must be rejected like any other non-positive one (kd_ratio NaN already is)."""
    with pytest.raises(KdbenchError, match="kd_ratio"):
        KD.make_params({"kd_ratio": float("nan")})
    with pytest.raises(KdbenchError, match="temperature"):
        KD.make_params({"temperature": float("nan")})
