"""The paper's DPKD loss (sequence level, teacher as DPO reference) on hand-built log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.objectives import Need, PreferencePair, Reduction, SequenceView
from kdbench_plugins.dpkd import DPKD, dpkd_loss


def pair(student_chosen: float, teacher_chosen: float, student_rejected: float, teacher_rejected: float,
         chosen_length: int = 4, rejected_length: int = 2) -> PreferencePair:
    def t(value: float) -> torch.Tensor:
        return torch.tensor([value])

    return PreferencePair(t(student_chosen), t(teacher_chosen), t(chosen_length),
                          t(student_rejected), t(teacher_rejected), t(rejected_length))


def test_loss_is_log_two_when_the_student_equals_the_teacher_on_both_responses() -> None:
    for normalized in (True, False):
        got = dpkd_loss(pair(-7.0, -7.0, -3.0, -3.0), beta=0.1, length_normalized=normalized)
        assert float(got) == pytest.approx(math.log(2))


def test_loss_falls_as_the_students_reward_for_the_teacher_response_rises() -> None:
    values = [float(dpkd_loss(pair(chosen, -8.0, -3.0, -3.0), beta=0.5)) for chosen in (-12.0, -8.0, -4.0, 0.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # ... and rises as the student's reward for its own sample rises
    values = [float(dpkd_loss(pair(-8.0, -8.0, rejected, -3.0), beta=0.5)) for rejected in (-6.0, -3.0, 0.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_length_normalisation_matches_paper_eq_9_by_hand() -> None:
    # chosen: (−6 − (−10)) / 4 = 1; rejected: (−5 − (−4)) / 2 = −0.5; margin = β·1.5
    beta = 0.2
    want = -math.log(1 / (1 + math.exp(-beta * 1.5)))
    assert float(dpkd_loss(pair(-6.0, -10.0, -5.0, -4.0), beta)) == pytest.approx(want, rel=1e-6)
    # without it, the plain DPO margin β·(4 − (−1)) = β·5
    want = -math.log(1 / (1 + math.exp(-beta * 5.0)))
    assert float(dpkd_loss(pair(-6.0, -10.0, -5.0, -4.0), beta, length_normalized=False)) == pytest.approx(want, rel=1e-6)


def test_gradient_raises_the_teacher_response_and_lowers_the_student_sample() -> None:
    chosen = torch.tensor([-6.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    loss = dpkd_loss(PreferencePair(chosen, torch.tensor([-6.0]), torch.tensor([3]), rejected,
                                    torch.tensor([-5.0]), torch.tensor([3])), beta=0.1)
    loss.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert float(chosen.grad) < 0 < float(rejected.grad)  # descent raises log q(y_t), lowers log q(y_s)


def test_declares_what_the_runner_must_provide() -> None:
    params = DPKD.make_params({})
    assert (params.beta, params.length_normalized, params.kd_ratio) == (0.1, True, 0.5)
    assert DPKD.needs_for(params) == {Need.TEACHER_LOGITS, Need.SFT_INIT}
    assert DPKD.reads == ("teacher_text", "student_samples")  # chosen, rejected
    assert DPKD.reduction is Reduction.SEQUENCE
    with pytest.raises(KdbenchError, match="beta"):
        DPKD.make_params({"beta": -1.0})


def test_pairs_come_from_the_views_of_the_two_sources_it_reads() -> None:
    """The loss DPKD computes from a teacher-text view and a student-sample view equals Eq. 9 on the summed,
    masked log-probabilities of each response, counted by hand."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1, 2, 3, 0], [2, 2, 0, 0]])

    def view(mask: list[list[bool]]) -> SequenceView:
        return SequenceView(torch.randn(2, 4, 5, generator=generator), labels, torch.tensor(mask),
                            torch.randn(2, 4, 5, generator=generator))

    chosen = view([[False, True, True, True], [False, True, False, False]])
    rejected = view([[False, True, True, False], [False, True, True, True]])

    def summed(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)

    by_hand = dpkd_loss(PreferencePair(summed(chosen.student_logits, chosen.mask), summed(chosen.teacher_logits, chosen.mask),
                                       chosen.mask.sum(-1), summed(rejected.student_logits, rejected.mask),
                                       summed(rejected.teacher_logits, rejected.mask), rejected.mask.sum(-1)), 0.1)
    got = DPKD.loss({"teacher_text": chosen, "student_samples": rejected}, DPKD.make_params({}))
    assert got.shape == (2,)
    torch.testing.assert_close(got, by_hand)
