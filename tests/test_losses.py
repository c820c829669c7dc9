"""Property tests of the divergences in kdbench.losses, on logits hypothesis draws (float64 unless noted)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdbench import losses

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Every divergence, with the parameters it takes; each is ≥ 0 and 0 where the distributions agree.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "jsd β=0.5": lambda s, t: losses.generalized_jsd(s, t, beta=0.5),
    "jsd β=0.1 scaled": lambda s, t: losses.generalized_jsd(s, t, beta=0.1, scaled=True),
    "tvd": losses.tvd,
    "skew_forward_kl": lambda s, t: losses.skew_forward_kl(s, t, alpha=0.1),
    "skew_reverse_kl": lambda s, t: losses.skew_reverse_kl(s, t, alpha=0.1),
    "adaptive_kl": lambda s, t: losses.adaptive_kl(s, t, mu=0.5),
    "topk_forward_kl k=3": lambda s, t: losses.topk_forward_kl(s, t, k=3),
    "topk_forward_kl k=3, no tail": lambda s, t: losses.topk_forward_kl(s, t, k=3, tail_bucket=False),
    "alpha_beta α=0.2 β=0.7": losses.alpha_beta_divergence,
    "alpha_beta α=0.5 β=0": lambda s, t: losses.alpha_beta_divergence(s, t, 0.5, 0.0),
    "alpha_beta α=0 β=0": lambda s, t: losses.alpha_beta_divergence(s, t, 0.0, 0.0),
}
TEMPERED: dict[str, Callable[..., torch.Tensor]] = {  # those taking a temperature, by the same names
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "tvd": losses.tvd,
    "adaptive_kl": losses.adaptive_kl,
    "topk_forward_kl": losses.topk_forward_kl,
    "generalized_jsd": losses.generalized_jsd,
    "alpha_beta_divergence": losses.alpha_beta_divergence,
}


@st.composite
def logit_pairs(draw: st.DrawFn, max_scale: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits (b, t, vocab) of one drawn shape and scale, from a drawn seed."""
    b, t, vocab = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 12))
    scale = draw(st.floats(0.01, max_scale))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    student, teacher = (torch.randn(b, t, vocab, generator=generator, dtype=torch.float64) * scale for _ in range(2))
    return student, teacher


def _kl_div(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per position by torch's own F.kl_div."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("name", DIVERGENCES)
@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs())
def test_each_divergence_is_nonnegative_and_zero_at_equality(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    divergence, (student, teacher) = DIVERGENCES[name], pair
    values = divergence(student, teacher)
    assert values.shape == student.shape[:2] and torch.isfinite(values).all()
    assert (values >= -1e-12).all()
    torch.testing.assert_close(divergence(teacher, teacher), torch.zeros_like(values), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), alpha=st.floats(0.0, 0.9), beta=st.floats(0.01, 0.99))
def test_kl_divergences_agree_with_f_kl_div(pair: tuple[torch.Tensor, torch.Tensor], alpha: float, beta: float) -> None:
    """Forward, reverse, skew and JSD against F.kl_div, with every mixture formed in probability space."""
    student, teacher = pair
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    q, p = log_q.exp(), log_p.exp()
    close = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(losses.forward_kl(student, teacher), _kl_div(log_p, log_q), **close)
    torch.testing.assert_close(losses.reverse_kl(student, teacher), _kl_div(log_q, log_p), **close)
    torch.testing.assert_close(losses.skew_forward_kl(student, teacher, alpha),
                               _kl_div(log_p, (alpha * p + (1 - alpha) * q).log()), **close)
    torch.testing.assert_close(losses.skew_reverse_kl(student, teacher, alpha),
                               _kl_div(log_q, (alpha * q + (1 - alpha) * p).log()), **close)
    log_m = (beta * p + (1 - beta) * q).log()
    torch.testing.assert_close(losses.generalized_jsd(student, teacher, beta),
                               beta * _kl_div(log_p, log_m) + (1 - beta) * _kl_div(log_q, log_m), **close)


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), scaled=st.booleans())
def test_generalized_jsd_endpoints_are_forward_and_reverse_kl(pair: tuple[torch.Tensor, torch.Tensor], scaled: bool) -> None:
    """TRL's convention: β = 0 is KL(p‖q), β = 1 is KL(q‖p), scaled or not."""
    student, teacher = pair
    torch.testing.assert_close(losses.generalized_jsd(student, teacher, 0.0, scaled), losses.forward_kl(student, teacher))
    torch.testing.assert_close(losses.generalized_jsd(student, teacher, 1.0, scaled), losses.reverse_kl(student, teacher))


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(max_scale=3.0))
def test_scaled_jsd_is_continuous_at_the_endpoints_and_the_plain_one_is_not(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = pair
    forward, reverse = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)

    def gap(beta: float, limit: torch.Tensor) -> torch.Tensor:
        return (losses.generalized_jsd(student, teacher, beta, scaled=True) - limit).abs()

    # Continuous: the gap to each KL shrinks in proportion to the distance from the end (a tenth of it for a tenth of
    # the distance), down to float64's rounding of the division by β (about 1e-16·log V / β). The gap is O(β·χ²), so
    # no fixed tolerance at one β bounds it for every pair (one did not, at β = 1e-7, for a drawn pair).
    assert (gap(1e-8, forward) <= 0.25 * gap(1e-7, forward) + 1e-6 * (1 + forward.abs())).all()
    assert (gap(1 - 1e-8, reverse) <= 0.25 * gap(1 - 1e-7, reverse) + 1e-6 * (1 + reverse.abs())).all()
    # Unscaled, it tends to 0 at both ends instead (TRL's discontinuity).
    assert (losses.generalized_jsd(student, teacher, 1e-7) <= 1e-6 * forward + 1e-12).all()
    assert (losses.generalized_jsd(student, teacher, 1 - 1e-7) <= 1e-6 * reverse + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(max_scale=3.0), exponent=st.floats(0.1, 1.5))
def test_alpha_beta_divergence_reduces_to_both_kls_and_is_continuous_where_an_exponent_is_zero(
        pair: tuple[torch.Tensor, torch.Tensor], exponent: float) -> None:
    """(α, β) = (1, 0) is KL(p‖q) and (0, 1) is KL(q‖p); the general formula tends to the edge cases."""
    student, teacher = pair
    divergence = losses.alpha_beta_divergence
    torch.testing.assert_close(divergence(student, teacher, 1.0, 0.0), losses.forward_kl(student, teacher))
    torch.testing.assert_close(divergence(student, teacher, 0.0, 1.0), losses.reverse_kl(student, teacher))
    near = {"rtol": 1e-3, "atol": 1e-6}
    torch.testing.assert_close(divergence(student, teacher, exponent, 1e-7), divergence(student, teacher, exponent, 0.0), **near)
    torch.testing.assert_close(divergence(student, teacher, 1e-7, exponent), divergence(student, teacher, 0.0, exponent), **near)


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), extra=st.integers(0, 3))
def test_topk_kd_is_forward_kl_when_k_covers_the_vocabulary(pair: tuple[torch.Tensor, torch.Tensor], extra: int) -> None:
    student, teacher = pair
    k = student.shape[-1] + extra
    torch.testing.assert_close(losses.topk_forward_kl(student, teacher, k), losses.forward_kl(student, teacher))


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), k=st.integers(1, 12))
def test_topk_kd_never_exceeds_forward_kl(pair: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    """Merging tokens into one bucket can only lose divergence (the data-processing inequality)."""
    student, teacher = pair
    assert (losses.topk_forward_kl(student, teacher, k) <= losses.forward_kl(student, teacher) + 1e-12).all()


def test_topk_tail_bucket_hand_computed() -> None:
    """p = [.5, .3, .2], q = [.2, .3, .5], k = 1: buckets (.5, .5) against (.2, .8)."""
    teacher = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64).log()
    student = torch.tensor([[[0.2, 0.3, 0.5]]], dtype=torch.float64).log()
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.2)) + 0.5 * torch.log(torch.tensor(0.5 / 0.8))
    torch.testing.assert_close(losses.topk_forward_kl(student, teacher, k=1), expected.double().reshape(1, 1))
    assert losses.topk_forward_kl(student, teacher, k=1, tail_bucket=False).item() == 0.0  # one token, renormalised


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), mu=st.floats(0.05, 0.95))
def test_adaptive_kl_lies_between_forward_and_reverse_kl(pair: tuple[torch.Tensor, torch.Tensor], mu: float) -> None:
    """A convex combination of the two, weighted by the gaps on the head and the tail."""
    student, teacher = pair
    forward, reverse = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)
    value = losses.adaptive_kl(student, teacher, mu)
    assert (value >= torch.minimum(forward, reverse) - 1e-12).all()
    assert (value <= torch.maximum(forward, reverse) + 1e-12).all()


def test_adaptive_kl_head_holds_the_teachers_top_mass() -> None:
    """p = [.6, .3, .1], μ = .5: the head is token 0 only; q = [.3, .3, .4] misses it by .3 and the tail by .3,
    so the weights are ½ and ½; with μ = .8 the head is tokens 0 and 1 (gaps .3 + 0 against .3)."""
    teacher = torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64).log()
    student = torch.tensor([[[0.3, 0.3, 0.4]]], dtype=torch.float64).log()
    forward, reverse = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)
    torch.testing.assert_close(losses.adaptive_kl(student, teacher, mu=0.5), 0.5 * forward + 0.5 * reverse)
    student = torch.tensor([[[0.3, 0.5, 0.2]]], dtype=torch.float64).log()  # gaps .3, .2 (head) and .1 (tail)
    forward, reverse = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)
    torch.testing.assert_close(losses.adaptive_kl(student, teacher, mu=0.8), 5 / 6 * forward + 1 / 6 * reverse)


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs())
def test_tvd_is_bounded_and_below_pinsker(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = pair
    value = losses.tvd(student, teacher)
    assert (value <= 1 + 1e-12).all()
    assert (value <= (losses.forward_kl(student, teacher) / 2).sqrt() + 1e-9).all()


@pytest.mark.parametrize("name", TEMPERED)
def test_temperature_divides_both_logits(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 3, 7, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    divergence = TEMPERED[name]
    torch.testing.assert_close(divergence(student, teacher, temperature=2.0), divergence(student / 2, teacher / 2))
    assert not torch.allclose(divergence(student, teacher, temperature=2.0), divergence(student, teacher))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_logits_are_computed_in_float32(name: str) -> None:
    """bf16 logits give float32 values equal to those of the same (rounded) logits in float32, and finite
    gradients."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = (torch.randn(2, 3, 50, generator=generator) * 4 for _ in range(2))
    student = student.bfloat16().requires_grad_()
    values = DIVERGENCES[name](student, teacher.bfloat16())
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, DIVERGENCES[name](student.detach().float(), teacher.bfloat16().float()))
    values.sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_probability_tokens_give_finite_values_and_gradients(name: str) -> None:
    """Logits of −inf (a token both models rule out) add 0·log 0 = 0 and no NaN gradient."""
    generator = torch.Generator().manual_seed(2)
    student, teacher = (torch.randn(1, 2, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    student[..., -1] = teacher[..., -1] = float("-inf")
    student.requires_grad_()
    values = DIVERGENCES[name](student, teacher)
    assert torch.isfinite(values).all()
    values.sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    torch.testing.assert_close(DIVERGENCES[name](teacher, teacher), torch.zeros_like(values), rtol=0, atol=1e-12)


@contextmanager
def chunk_budget(elements: int) -> Iterator[None]:
    saved, losses.CHUNK_ELEMENTS = losses.CHUNK_ELEMENTS, elements
    try:
        yield
    finally:
        losses.CHUNK_ELEMENTS = saved


def values_and_gradient(divergence: Divergence, student: torch.Tensor, teacher: torch.Tensor,
                        weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence per position, and the gradient in the student's logits of its sum weighted per position (as
    the runner's mask and normalisation weight it)."""
    leaf = student.detach().requires_grad_()
    values = divergence(leaf, teacher)
    (gradient,) = torch.autograd.grad((values * weights).sum(), leaf)
    return values.detach(), gradient


CHUNKED = {**DIVERGENCES, "soft_cross_entropy τ=2": lambda s, t: losses.soft_cross_entropy(s, t, 2.0),
           "forward_kl τ=0.5 (keyword)": lambda s, t: losses.forward_kl(s, t, temperature=0.5)}


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("budget", [1, 20, 40], ids=["one position a piece", "spans of a row", "whole rows"])
@settings(max_examples=5, deadline=None)
@given(pair=logit_pairs(), masked=st.integers(0, 3), bf16=st.booleans())
def test_chunked_evaluation_gives_the_unchunked_values_and_gradients(
        name: str, budget: int, pair: tuple[torch.Tensor, torch.Tensor], masked: int, bf16: bool) -> None:
    """Piece by piece (``losses.token_chunked``: forward without keeping temporaries, each piece recomputed in
    backward) every position gets the arithmetic of the whole-tensor evaluation: the same values and gradients,
    whatever the pieces, with positions the runner masks out (weight 0), and on bf16 logits."""
    student, teacher = (x.to(torch.bfloat16) for x in pair) if bf16 else pair
    weights = torch.rand(student.shape[:-1], generator=torch.Generator().manual_seed(masked), dtype=torch.float64)
    weights.view(-1)[:masked] = 0
    weights = weights.to(torch.float32 if bf16 else torch.float64)
    whole = values_and_gradient(CHUNKED[name], student, teacher, weights)
    with chunk_budget(budget):
        chunked = values_and_gradient(CHUNKED[name], student, teacher, weights)
    # float64 agrees to rounding; float32 (what bf16 logits are computed in) to 1e-6, as vectorised sums over pieces
    # of another shape may round once differently; a bf16 gradient to its own last bit.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0**-7}
    for got, want in zip(chunked, whole):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tolerance[got.dtype], atol=tolerance[got.dtype])


def test_pieces_cover_every_position_once() -> None:
    for shape, budget in [((3, 5, 4), 1), ((3, 5, 4), 8), ((3, 5, 4), 20), ((3, 5, 4), 45), ((7, 4), 9), ((3, 5, 4), 999)]:
        covered = torch.zeros(shape[:-1], dtype=torch.int64)
        for piece in losses.pieces(torch.Size(shape), budget):
            covered[piece] += 1
            assert covered[piece].numel() * shape[-1] <= max(budget, shape[-1])
        assert bool((covered == 1).all()), (shape, budget)
