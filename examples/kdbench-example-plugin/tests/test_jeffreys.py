"""The example objective, tested with kdbench's plugin-author kit (fixtures arrive through its pytest plugin)."""

from __future__ import annotations

import torch
from kdbench.losses import forward_kl, reverse_kl
from kdbench.objectives import GOLD, SequenceView
from kdbench.registry import load_registries
from kdbench.testing import TinyKit, objective_contract

from kdbench_example_plugin.jeffreys import Jeffreys


def test_jeffreys_keeps_the_objective_contract(kdbench_kit: TinyKit) -> None:
    """Finite loss and gradients, masked positions ignored, bf16, zero at the teacher, and one real engine
    step given exactly what it declares."""
    objective_contract(Jeffreys, kdbench_kit)


def test_jeffreys_is_the_mean_of_both_kls(kdbench_logits: SequenceView) -> None:
    student, teacher = kdbench_logits.logits()
    expected = (forward_kl(student, teacher) + reverse_kl(student, teacher)) / 2
    torch.testing.assert_close(Jeffreys.loss({GOLD: kdbench_logits}, Jeffreys.make_params({})), expected)


def test_jeffreys_is_symmetric(kdbench_logits: SequenceView) -> None:
    student, teacher = kdbench_logits.logits()
    params = Jeffreys.make_params({})
    swapped = SequenceView(teacher, kdbench_logits.labels, kdbench_logits.mask, student)
    torch.testing.assert_close(Jeffreys.loss({GOLD: kdbench_logits}, params), Jeffreys.loss({GOLD: swapped}, params))


def test_the_installed_package_registers_it() -> None:
    assert load_registries().objectives.get("jeffreys") is Jeffreys
