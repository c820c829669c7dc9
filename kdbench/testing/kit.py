"""A tiny teacher, student, tokenizer and data set for testing plugins, and hand-built logits.

The models are real Hugging Face folders, built from the ``gpt2`` family's config class with kdbench's own
zoo and loaded with ``from_pretrained``, as every model of a run is; the teacher gets a short SFT through
the real engine so that its distributions are far from uniform, as a teacher's are.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kdbench.config import TrainingConfig
from kdbench.data import TEMPLATE_PIECES, TokenizedExample, format_prompt, tokenize_records
from kdbench.objectives import SequenceView
from kdbench.registry import load_registries
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.train.engine import TrainingData, train
from kdbench.train.generation import sample_continuations
from kdbench.zoo import TinyArch, build_tiny_model, load_model, load_tokenizer, train_tokenizer

FAMILY = "gpt2"
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 48
SAMPLE_TOKENS = 8  # bound on every sampled response: the stored teacher texts and the student's samples
TEACHER_ARCH, STUDENT_ARCH = TinyArch(width=32, layers=2, heads=2), TinyArch(width=16, layers=1, heads=1)


@dataclass(frozen=True)
class TinyKit:
    """Folders ``tokenizer``, ``teacher`` and ``student`` under ``root``, the training examples (prompts with
    gold responses) and one stored teacher sample per example, as the ``teacher_text`` source reads them."""

    root: Path
    tokenizer: Any
    examples: list[TokenizedExample]
    teacher_texts: list[TokenizedExample]

    @property
    def teacher_path(self) -> Path:
        return self.root / "teacher"

    @property
    def student_path(self) -> Path:
        return self.root / "student"

    def teacher(self) -> PreTrainedModel:
        """A fresh load of the teacher, frozen and in eval mode, as the runner holds it."""
        return load_model(str(self.teacher_path)).eval().requires_grad_(False)

    def student(self) -> PreTrainedModel:
        """A fresh load of the (untrained) student."""
        return load_model(str(self.student_path))

    def training_data(self, with_teacher_texts: bool = True) -> TrainingData:
        tokenizer = self.tokenizer
        return TrainingData(self.examples, tokenizer.pad_token_id, tokenizer.eos_token_id,
                            self.teacher_texts if with_teacher_texts else None, SAMPLE_TOKENS)

    @classmethod
    def build(cls, root: Path, n_examples: int = 200, teacher_steps: int = 40) -> TinyKit:
        """Tokenizer, models and data written under ``root`` (a few seconds on one CPU core)."""
        records = generate(TinySuiteOptions(n_train=n_examples, n_validation=1, n_test=1))["train"]
        train_tokenizer((format_prompt(r) + str(r["response"]) for r in records), 300, root / "tokenizer", TEMPLATE_PIECES)
        tokenizer = load_tokenizer(str(root / "tokenizer"))
        registries = load_registries()
        family = registries.families.get(FAMILY)
        build_tiny_model(family, TEACHER_ARCH, tokenizer, MAX_LENGTH, 0, root / "teacher")
        build_tiny_model(family, STUDENT_ARCH, tokenizer, MAX_LENGTH, 1, root / "student")
        examples = tokenize_records(records, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
        sft = registries.objectives.get("sft")
        settings = TrainingConfig(engine="accelerate", lr=1e-2, warmup_steps=0, batch_size=16, max_steps=teacher_steps,
                                  threads=1)
        data = TrainingData(examples, tokenizer.pad_token_id, tokenizer.eos_token_id)
        teacher, _ = train(load_model(str(root / "teacher")), sft, sft.make_params({}), data, settings, 0,
                           save_to=root / "teacher", tokenizer=tokenizer)
        texts = sample_continuations(teacher, examples, SAMPLE_TOKENS, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     MAX_LENGTH, torch.Generator().manual_seed(0))
        return cls(root, tokenizer, examples, texts)


@functools.cache
def default_kit() -> TinyKit:
    """One kit per process, in a temporary folder, for ``objective_contract`` called without one."""
    return TinyKit.build(Path(tempfile.mkdtemp(prefix="kdbench-kit-")))


def hand_built_view(batch: int = 2, length: int = 6, vocab: int = 11, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> SequenceView:
    """Random student and teacher logits (b, t, vocab) of scale 3, random labels and a mask with a prompt
    position and padding off: the inputs of a pure loss, for unit tests that need no model."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher = (torch.randn(batch, length, vocab, generator=generator) * 3 for _ in range(2))
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, 0] = False  # a prompt position
    mask[-1, -2:] = False  # padding of a shorter row
    return SequenceView(student.to(dtype), labels, mask, teacher.to(dtype))
