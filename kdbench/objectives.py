"""What an objective is, and the parts of every loss the runner owns.

An objective is one short module: a class naming itself, declaring what it needs and its
parameters, and a *pure* per-token loss. The runner (``kdbench.engine``) does the rest the same way
for every objective — shifting, masking prompt and padding, the ``kd_ratio`` mix with gold
cross-entropy, and normalising by the global count of response tokens in an optimizer step — so no
two objectives can differ in those details by accident.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError


class Need(str, Enum):
    """What the runner must provide before an objective's loss can be computed."""

    TEACHER_LOGITS = "teacher_logits"  # the teacher under teacher forcing on the sequences the loss reads
    TEACHER_GENERATIONS = "teacher_generations"  # one stored, sampled teacher response per training prompt
    SFT_INIT = "sft_init"  # start from the student fine-tuned with sft (same student, same seed)


class Sequence(str, Enum):
    """Which response of a training prompt an objective's token loss is taken on."""

    GOLD = "gold"  # the data set's response
    TEACHER = "teacher"  # the stored teacher generation (needs TEACHER_GENERATIONS)


@dataclass(frozen=True)
class ObjectiveParams:
    """Parameters every objective has. ``L = (1 - kd_ratio)·CE_gold + kd_ratio·L_objective``."""

    kd_ratio: float = 0.5

    def check(self) -> list[str]:
        """Problems with the values, one message each; empty when valid."""
        return [] if 0.0 <= self.kd_ratio <= 1.0 else [f"kd_ratio must be in [0, 1], got {self.kd_ratio}"]


@dataclass(frozen=True)
class TokenLossInputs:
    """Aligned so that position ``i`` of the logits predicts ``labels[:, i]``."""

    student_logits: torch.Tensor  # (b, t, vocab)
    labels: torch.Tensor  # (b, t) gold next-token ids (anything at masked positions)
    mask: torch.Tensor  # (b, t) bool: response tokens, the only ones a loss is taken on
    teacher_logits: torch.Tensor | None = None  # (b, t, vocab) when the objective needs them


class Objective:
    """Base class of objective plugins. Subclasses set the class variables and ``token_loss``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `kdbench plugins` and the README
    paper: ClassVar[str]  # where the formula comes from
    needs: ClassVar[frozenset[Need]] = frozenset()
    sequence: ClassVar[Sequence] = Sequence.GOLD
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    @classmethod
    def needs_for(cls, params: ObjectiveParams) -> frozenset[Need]:
        """What this objective needs with these parameters (an option may add a need)."""
        return cls.needs

    @staticmethod
    def token_loss(inputs: TokenLossInputs, params: Any) -> torch.Tensor:
        """The objective's loss at every position, shape (b, t), before masking and reduction."""
        raise NotImplementedError

    @classmethod
    def make_params(cls, values: dict[str, Any], where: str = "") -> ObjectiveParams:
        """Build ``Params`` from an experiment file's mapping; every problem is reported at once."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        errors: list[str] = []
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(f"{where}{key}: unknown parameter of {cls.name}{hint}; expected one of {sorted(fields)}")
        typed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                continue
            default = fields[key].default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if default is not dataclasses.MISSING and default is not None and type(value) is not type(default):
                errors.append(f"{where}{key}: expected {type(default).__name__}, got {value!r}")
                continue
            typed[key] = value
        if errors:
            raise KdbenchError("; ".join(errors))
        params = cls.Params(**typed)
        problems = params.check()
        if problems:
            raise KdbenchError("; ".join(f"{where}{p}" for p in problems))
        return params


def gold_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token CE on the gold tokens, (b, t); masked positions give 0 and never index out of range."""
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    log_probs = F.log_softmax(student_logits.float(), dim=-1)  # (b, t, vocab)
    return -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) * mask


def objective_token_loss(objective: type[Objective], params: ObjectiveParams, inputs: TokenLossInputs) -> torch.Tensor:
    """The objective's per-token loss, exactly zero outside the mask. (b, t)"""
    return torch.where(inputs.mask, objective.token_loss(inputs, params), torch.zeros((), device=inputs.mask.device))
