"""The plugin-author kit: every installed objective keeps the contract, and the contract catches broken ones."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from kdbench.losses import reverse_kl, soft_cross_entropy
from kdbench.objectives import GOLD, AtTeacher, LossInputs, Need, Objective, SequenceView, TemperatureParams
from kdbench.registry import load_registries
from kdbench.testing import TinyKit, objective_contract
from kdbench_plugins.rkl import ReverseKL

INSTALLED = load_registries().objectives.names()


def test_the_seed_and_the_new_objectives_are_all_installed() -> None:
    seed = {"sft", "kd", "seqkd", "minillm", "dpkd", "dpkd-token"}
    new = {"rkl", "jsd", "gkd", "tvd", "skl", "srkl", "akl", "topk-kd", "opd", "abkd"}
    assert seed | new <= set(INSTALLED)


@pytest.mark.parametrize("name", INSTALLED)
def test_every_installed_objective_keeps_the_contract(name: str, kdbench_kit: TinyKit) -> None:
    objective_contract(load_registries().objectives.get(name), kdbench_kit)


def test_the_fixtures_are_real_models_loaded_from_their_folders(kdbench_kit: TinyKit, kdbench_teacher: PreTrainedModel,
                                                                kdbench_student: PreTrainedModel, kdbench_tokenizer: object,
                                                                kdbench_logits: SequenceView) -> None:
    assert (kdbench_kit.teacher_path / "config.json").is_file() and (kdbench_kit.student_path / "config.json").is_file()
    assert kdbench_teacher.config.vocab_size == kdbench_student.config.vocab_size == len(kdbench_tokenizer)  # type: ignore[arg-type]
    assert not kdbench_teacher.training and kdbench_teacher.num_parameters() > kdbench_student.num_parameters()
    assert len(kdbench_kit.teacher_texts) == len(kdbench_kit.examples) > 100
    # The teacher was fine-tuned: far from uniform, unlike the untrained student.
    batch = torch.tensor([kdbench_kit.examples[0].input_ids])
    with torch.no_grad():
        entropy = {name: -(model(batch).logits.log_softmax(-1).exp() * model(batch).logits.log_softmax(-1)).sum(-1).mean()
                   for name, model in (("teacher", kdbench_teacher), ("student", kdbench_student))}
    assert entropy["teacher"] < entropy["student"] - 1.0
    assert kdbench_logits.teacher_logits is not None and kdbench_logits.mask.any() and not kdbench_logits.mask.all()


# -- broken objectives: each breaks one property, and the contract names it ----------------------------------

class UndeclaredTeacher(ReverseKL):
    name, needs = "undeclared-teacher", frozenset()


class ReadsMaskedPositions(ReverseKL):
    name = "reads-masked"

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        per_token = reverse_kl(*inputs[GOLD].logits())
        return per_token.mean(-1, keepdim=True).expand_as(per_token)  # a row mean over padding too


class NotZeroAtTeacher(ReverseKL):
    name = "not-zero"  # soft cross-entropy is H(p) at the teacher: MINIMUM, not ZERO

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        return soft_cross_entropy(*inputs[GOLD].logits())


class MaximalAtTeacher(ReverseKL):
    name, at_teacher = "maximal", AtTeacher.MINIMUM

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        return -reverse_kl(*inputs[GOLD].logits())


class Detached(ReverseKL):
    name = "detached"

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        return reverse_kl(*inputs[GOLD].logits()).detach()


class ChangesWithDtype(ReverseKL):
    name = "fp32-only"

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        student, teacher = inputs[GOLD].logits()
        return reverse_kl(student, teacher) * (1.0 if student.dtype == torch.float32 else 2.0)


class ReadsLogitsItself(ReverseKL):
    name = "reads-logits-itself"  # fused_head comes from ReverseKL, yet this loss does its own arithmetic on the logits

    @staticmethod
    def loss(inputs: LossInputs, params: TemperatureParams) -> torch.Tensor:
        student, teacher = inputs[GOLD].logits()
        log_q, log_p = student.float().log_softmax(-1), teacher.float().log_softmax(-1)
        return (log_q.exp() * (log_q - log_p)).sum(-1)


@pytest.mark.parametrize("objective,complaint", [
    (UndeclaredTeacher, "one engine step given exactly what it declares"),
    (ReadsMaskedPositions, "changing only masked positions"),
    (NotZeroAtTeacher, "declares at_teacher=zero, but its loss there"),
    (MaximalAtTeacher, "moving the student away from the teacher lowers"),
    (Detached, "detached from the student's logits"),
    (ChangesWithDtype, "on bf16 logits"),
    (ReadsLogitsItself, "declares fused_head, but its loss fails on HeadLogits"),
])
def test_the_contract_names_the_property_a_broken_objective_breaks(objective: type[Objective], complaint: str,
                                                                    kdbench_kit: TinyKit) -> None:
    with pytest.raises(AssertionError, match=complaint) as raised:
        objective_contract(objective, kdbench_kit)
    assert repr(objective.name) in str(raised.value)


def test_needs_declared_by_an_option_are_given_to_the_engine(kdbench_kit: TinyKit) -> None:
    """seqkd with word_kd asks for teacher logits through needs_for: the contract's engine step provides them."""
    seqkd = load_registries().objectives.get("seqkd")
    params = seqkd.make_params({"word_kd": True})
    assert Need.TEACHER_LOGITS in seqkd.needs_for(params)
    objective_contract(seqkd, kdbench_kit, params)
