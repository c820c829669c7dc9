"""What an objective is, and the parts of every loss the runner owns.

An objective is one short module: a class naming itself, declaring what it needs, the sequences
it reads and its parameters, and a *pure* loss (per token, per preference pair, or per rollout
token). The runner (``kdbench.engine``) does the rest the same way
for every objective — shifting, masking prompt and padding, the ``kd_ratio`` mix with gold
cross-entropy, and normalising by the global count of response tokens (or pairs) in an optimizer
step — so no two objectives can differ in those details by accident.
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
    STUDENT_SAMPLES = "student_samples"  # responses sampled from the current student as training goes
    ROLLOUTS = "rollouts"  # samples of (1 − α)·student + α·teacher with per-token probabilities: ``rollout_spec``


class Sequence(str, Enum):
    """Which response of a training prompt an objective's token loss is taken on."""

    GOLD = "gold"  # the data set's response
    TEACHER = "teacher"  # the stored teacher generation (needs TEACHER_GENERATIONS)
    PAIR = "pair"  # the stored teacher generation preferred over a fresh student sample: ``pair_loss``
    ROLLOUT = "rollout"  # the objective's own rollouts, reused for several inner epochs: ``rollout_loss``


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


@dataclass(frozen=True)
class PreferencePair:
    """Summed response log-probabilities, (b,) each, of a preferred and a dispreferred response to the
    same prompts, under the student (q) and the teacher (p), with the response lengths in tokens."""

    student_logp_chosen: torch.Tensor  # log q(y_w|x)
    teacher_logp_chosen: torch.Tensor  # log p(y_w|x)
    chosen_length: torch.Tensor
    student_logp_rejected: torch.Tensor  # log q(y_l|x)
    teacher_logp_rejected: torch.Tensor  # log p(y_l|x)
    rejected_length: torch.Tensor


@dataclass(frozen=True)
class RolloutSpec:
    """How the runner collects rollouts: ``batches`` micro-batches of prompts are sampled from
    ``(1 − teacher_mix)·q + teacher_mix·p``, then trained on for ``inner_epochs`` passes."""

    teacher_mix: float
    batches: int
    inner_epochs: int


@dataclass(frozen=True)
class RolloutInputs:
    """Rollout tensors aligned so position ``i`` holds the sampled token ``i + 1``; all (b, t) unless noted."""

    student_logits: torch.Tensor  # (b, t, vocab) the student being trained
    teacher_logits: torch.Tensor  # (b, t, vocab)
    actions: torch.Tensor  # sampled token ids
    mask: torch.Tensor  # bool: sampled response tokens (through EOS)
    old_logp: torch.Tensor  # log q_old(y_t) of the student that sampled
    teacher_logp: torch.Tensor  # log p(y_t)
    mixture_logp: torch.Tensor  # log of the sampling distribution at y_t


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

    @staticmethod
    def pair_loss(pair: PreferencePair, params: Any) -> torch.Tensor:
        """For ``sequence = PAIR`` objectives: the loss of every pair, shape (b,), averaged by the runner
        over all pairs of the optimizer step."""
        raise NotImplementedError

    @staticmethod
    def rollout_loss(inputs: RolloutInputs, params: Any) -> torch.Tensor:
        """For ``sequence = ROLLOUT`` objectives: the loss at every rollout position, (b, t), averaged by
        the runner over all rollout tokens of the optimizer step."""
        raise NotImplementedError

    @classmethod
    def rollout_spec(cls, params: Any) -> RolloutSpec:
        """For ``sequence = ROLLOUT`` objectives: how the runner collects rollouts."""
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
