"""The kit's pytest fixtures: a tiny kit built once per session, fresh models from it, hand-built logits.
Nothing heavy is imported until a fixture is used (see ``kdbench.testing``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kdbench.objectives import SequenceView
    from kdbench.testing.kit import TinyKit


@pytest.fixture(scope="session")
def kdbench_kit(tmp_path_factory: pytest.TempPathFactory) -> TinyKit:
    """Tokenizer, teacher, student and data, built once per test session (a few seconds)."""
    from kdbench.testing.kit import TinyKit

    return TinyKit.build(tmp_path_factory.mktemp("kdbench-kit"))


@pytest.fixture
def kdbench_tokenizer(kdbench_kit: TinyKit) -> Any:
    return kdbench_kit.tokenizer


@pytest.fixture
def kdbench_teacher(kdbench_kit: TinyKit) -> PreTrainedModel:
    """The teacher, frozen, in eval mode, loaded afresh with ``from_pretrained``."""
    return kdbench_kit.teacher()


@pytest.fixture
def kdbench_student(kdbench_kit: TinyKit) -> PreTrainedModel:
    """The untrained student, loaded afresh with ``from_pretrained`` (a test may train it)."""
    return kdbench_kit.student()


@pytest.fixture
def kdbench_logits() -> SequenceView:
    """Hand-built student and teacher logits (2, 6, 11), labels and a mask: the inputs of a pure loss."""
    from kdbench.testing.kit import hand_built_view

    return hand_built_view()
