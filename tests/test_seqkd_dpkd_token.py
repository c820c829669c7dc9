"""Mathematical properties of seqkd and dpkd-token on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.objectives import Need, SequenceView, gold_cross_entropy, soft_cross_entropy
from kdbench_plugins.dpkd_token import DPKDToken, token_preference_loss
from kdbench_plugins.seqkd import SeqKD


def test_dpkd_token_matches_a_hand_computed_value() -> None:
    teacher = torch.tensor([[[2.0, 0.0, 0.0]]])  # teacher's top token: 0
    student = torch.tensor([[[0.0, 1.0, 0.0]]])  # student's top token: 1
    log_p, log_q = F.log_softmax(teacher, -1)[0, 0], F.log_softmax(student, -1)[0, 0]
    h = (log_q[0] - log_q[1]) - (log_p[0] - log_p[1])  # = (0 − 1) − (2 − 0) = −3
    assert float(h) == pytest.approx(-3.0)
    want = -math.log(1 / (1 + math.exp(0.1 * 3.0)))
    assert float(token_preference_loss(student, teacher, beta=0.1)) == pytest.approx(want, rel=1e-6)


def test_dpkd_token_gives_no_gradient_where_both_argmaxes_agree() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 9)
    agree = torch.tensor([[True, False, True, False], [False, True, False, False]])
    top = teacher.argmax(-1)  # (2, 4)
    student_top = torch.where(agree, top, (top + 1) % 9)  # the student's top token, chosen per position
    student = (torch.randn(2, 4, 9) + 10 * F.one_hot(student_top, 9)).requires_grad_(True)
    assert torch.equal(student.argmax(-1) == top, agree)
    loss = token_preference_loss(student, teacher, beta=0.1)
    torch.testing.assert_close(loss[agree], torch.full_like(loss[agree], math.log(2)))
    loss.sum().backward()
    assert student.grad is not None
    assert (student.grad[agree] == 0).all()
    assert (student.grad[~agree].abs().sum(-1) > 0).all()


def test_dpkd_token_falls_as_the_student_prefers_the_teachers_token() -> None:
    teacher = torch.tensor([[[3.0, 1.0, 0.0, 0.0]]])
    values = []
    for boost in (0.0, 0.5, 1.0, 1.5):  # raise the teacher's top token, still below the student's top
        student = torch.tensor([[[boost, 2.0, 0.0, 0.0]]])
        values.append(float(token_preference_loss(student, teacher, beta=0.5)))
    assert all(a > b for a, b in zip(values, values[1:]))


def test_dpkd_token_declares_teacher_logits_and_checks_beta() -> None:
    # SFT init: the released runner's (dpkd/scripts/dpkd-gpt2_base_runner.sh:20), followed under `paper`.
    assert DPKDToken.needs_for(DPKDToken.make_params({})) == frozenset({Need.TEACHER_LOGITS, Need.SFT_INIT})
    assert DPKDToken.make_params({}).beta == 0.1
    with pytest.raises(KdbenchError, match="beta"):
        DPKDToken.make_params({"beta": 0.0})


def _seqkd_inputs() -> SequenceView:
    torch.manual_seed(1)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, True]])
    return SequenceView(torch.randn(2, 5, 7), labels, mask, teacher_logits=torch.randn(2, 5, 7))


def test_seqkd_is_cross_entropy_on_the_teacher_sequence() -> None:
    inputs = _seqkd_inputs()
    params = SeqKD.make_params({})
    got = SeqKD.loss({"teacher_text": inputs}, params)
    torch.testing.assert_close(got, gold_cross_entropy(inputs.student_logits, inputs.labels, inputs.mask))
    assert SeqKD.reads == ("teacher_text",)
    assert SeqKD.needs_for(params) == frozenset()


def test_seqkd_word_kd_adds_soft_cross_entropy_on_the_teacher_text() -> None:
    inputs = _seqkd_inputs()
    params = SeqKD.make_params({"word_kd": True, "temperature": 2})
    assert inputs.teacher_logits is not None
    ce = gold_cross_entropy(inputs.student_logits, inputs.labels, inputs.mask)
    kd = soft_cross_entropy(inputs.student_logits, inputs.teacher_logits, 2.0)
    got = SeqKD.loss({"teacher_text": inputs}, params)
    torch.testing.assert_close(got[inputs.mask], (0.5 * ce + 0.5 * kd)[inputs.mask])
    assert SeqKD.needs_for(params) == frozenset({Need.TEACHER_LOGITS})
