"""What an objective is, and the parts of every loss the runner owns.

An objective is one short module: a class naming itself with a ``version``, declaring what it needs
(teacher logits, an SFT-initialised student), which sequences it reads (``reads``: names of sequence
sources — gold, stored teacher text, fresh student samples, teacher-mixed rollouts — each a plugin),
whether its loss is per token or per sequence, its parameters, and a *pure* ``loss`` over the
``SequenceView`` of every sequence it reads. The runner (``kdbench.train.engine``) does the rest the
same way for every objective — running the models on the sequences, shifting, masking prompt and
padding, the ``kd_ratio`` mix with gold cross-entropy, and normalising by the global count of
response tokens (or sequences) in an optimizer step — so no two objectives can differ in those
details by accident.

What a step trains on. ``GOLD`` names a *role* as well as the source of the data set's responses: the
sequences the runner's ``(1 − kd_ratio)·CE`` term reads, and the ones an objective reading ``GOLD``
receives under that name. The role is filled by the source ``ObjectiveParams.train_on`` names — ``gold``
by default; ``teacher_text`` for the recipes that train on the teacher's pseudo data (MiniLLM's SeqKD
baseline, DPKD's released code), so their CE term *and* a loss reading ``GOLD`` both read the teacher's
samples. Every other name in ``reads`` is a source as it stands. Micro-batches and loss inputs are keyed
by role; a source filling two roles is asked once and run through the models once. ``sft`` with
``train_on: teacher_text`` is classic SeqKD. The runner never looks at an objective's name for this.

The mode of the network. ``Objective.train_mode`` says whether the student is in train mode (dropout
on) while it trains: true by default; MiniLLM runs the policy in eval mode, so the policy that sampled a
rollout and the one being updated are one deterministic network.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from kdbench.errors import KdbenchError
from kdbench.losses import Logits, label_nll
from kdbench.losses import soft_cross_entropy as soft_cross_entropy  # re-exported: where plugins have long imported it

GOLD = "gold"  # the source of the data set's own responses; as a role, the sequences the CE term reads


class Need(str, Enum):
    """What the runner must provide before a loss can be computed (objectives and sources declare them)."""

    TEACHER_LOGITS = "teacher_logits"  # the teacher under teacher forcing on every sequence the loss reads
    TEACHER_MODEL = "teacher_model"  # the teacher itself while training runs (a source samples from it)
    TEACHER_GENERATIONS = "teacher_generations"  # one stored, sampled teacher response per training prompt
    SFT_INIT = "sft_init"  # start from the student fine-tuned with sft (same student, same seed)


class AtTeacher(str, Enum):
    """What an objective's loss does where the student's distributions equal the teacher's: the property
    ``kdbench.testing.objective_contract`` checks (none, where the loss does not pull toward the teacher)."""

    ZERO = "zero"  # a divergence: ≥ 0 everywhere, 0 there (rkl, jsd, tvd, …)
    MINIMUM = "minimum"  # minimal there with zero gradient, but not 0 (kd's soft cross-entropy is H(p) there)
    STATIONARY = "stationary"  # zero gradient there; the value is a sampled estimate that may dip below it (opd)


class Reduction(str, Enum):
    """What the runner averages an objective's loss over, globally per optimizer step."""

    TOKEN = "token"  # loss (b, t): over the response tokens of the first sequence the objective reads
    SEQUENCE = "sequence"  # loss (b,): over the sequences (pairs) of the first sequence it reads


@dataclass(frozen=True)
class ObjectiveParams:
    """Parameters every objective has. ``L = (1 - kd_ratio)·CE(train_on) + kd_ratio·L_objective``."""

    kd_ratio: float = 0.5
    # The source that fills the GOLD role: the CE term's sequences, and those a loss reading GOLD receives.
    train_on: str = GOLD

    def check(self) -> list[str]:
        """Problems with the values, one message each; empty when valid."""
        problems = [] if 0.0 <= self.kd_ratio <= 1.0 else [f"kd_ratio must be in [0, 1], got {self.kd_ratio}"]
        if not self.train_on:
            problems.append(f"train_on must name a sequence source (e.g. {GOLD!r} or 'teacher_text'), got {self.train_on!r}")
        return problems


@dataclass(frozen=True)
class TemperatureParams(ObjectiveParams):
    """Parameters of an objective comparing the two next-token distributions, both logits divided by τ."""

    temperature: float = 1.0

    def check(self) -> list[str]:
        problems = super().check()
        if not self.temperature > 0:  # also rejects NaN
            problems.append(f"temperature must be > 0, got {self.temperature}")
        return problems


@dataclass(frozen=True)
class SequenceView:
    """One batch of sequences as a loss sees them, aligned so position ``i`` of the logits predicts
    ``labels[:, i]``; all (b, t) unless noted."""

    # (b, t, vocab) the student being trained, with gradients; ``HeadLogits`` (hidden states and the LM head, the
    # logits made a piece at a time) when the training settings fuse the head and the objective allows it
    student_logits: Logits
    labels: torch.Tensor  # the next token at every position (anything at masked positions)
    mask: torch.Tensor  # bool: response tokens, the only ones a loss is taken on
    teacher_logits: Logits | None = None  # (b, t, vocab) when the objective needs TEACHER_LOGITS
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # per-token values its source recorded

    def logits(self) -> tuple[Logits, Logits]:
        """(student, teacher) logits, (b, t, vocab) each."""
        assert self.teacher_logits is not None, "the objective must declare Need.TEACHER_LOGITS"
        return self.student_logits, self.teacher_logits

    def student_logp(self) -> torch.Tensor:
        """log q(label) at every position, 0 off the mask. (b, t)"""
        return -gold_cross_entropy(self.student_logits, self.labels, self.mask)

    def teacher_logp(self) -> torch.Tensor:
        """log p(label) at every position, 0 off the mask. (b, t)"""
        assert self.teacher_logits is not None, "the objective must declare Need.TEACHER_LOGITS"
        return -gold_cross_entropy(self.teacher_logits, self.labels, self.mask)

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per sequence. (b,)"""
        return self.mask.sum(-1)


# The views an objective's loss receives: source name → its view, one per name in ``reads``.
LossInputs = Mapping[str, SequenceView]


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

    @classmethod
    def from_views(cls, chosen: SequenceView, rejected: SequenceView) -> PreferencePair:
        return cls(chosen.student_logp().sum(-1), chosen.teacher_logp().sum(-1), chosen.lengths,
                   rejected.student_logp().sum(-1), rejected.teacher_logp().sum(-1), rejected.lengths)


class Objective:
    """Base class of objective plugins. Subclasses set the class variables and ``loss``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `kdbench plugins` and the README
    paper: ClassVar[str]  # where the formula comes from
    # Bump when the loss (or anything else that changes what training produces) changes: every cell
    # the objective trained gets a new key, so exactly those re-run and no stale number is re-printed.
    version: ClassVar[int] = 1
    needs: ClassVar[frozenset[Need]] = frozenset()
    # Sequence sources, in the order ``loss`` names them; GOLD is the role ``params.train_on`` fills.
    reads: ClassVar[tuple[str, ...]] = (GOLD,)
    reduction: ClassVar[Reduction] = Reduction.TOKEN
    at_teacher: ClassVar[AtTeacher | None] = None  # its loss where the student equals the teacher (kdbench.testing)
    # Why its gradient may be exactly 0 at a healthy start (the first-step guard then warns instead of failing);
    # None: a zero gradient means a bug or a degenerate cell (kdbench.train.guards).
    gradient_can_vanish: ClassVar[str | None] = None
    # Its loss reads the logits only through ``kdbench.losses``' divergences and the view's ``logits``,
    # ``student_logp`` and ``teacher_logp``, which all take ``HeadLogits``: the runner may then hand it the hidden
    # states and the LM head instead of the logits (the ``fused_head`` training setting).
    fused_head: ClassVar[bool] = False
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    @classmethod
    def needs_for(cls, params: ObjectiveParams) -> frozenset[Need]:
        """What this objective needs with these parameters (an option may add a need)."""
        return cls.needs

    @classmethod
    def train_mode(cls, params: ObjectiveParams) -> bool:
        """Whether the student trains in train mode (dropout on). Eval mode suits an objective whose loss
        compares the network with itself at another moment (a PPO ratio against the policy that sampled)."""
        return True

    @classmethod
    def source_options(cls, params: ObjectiveParams) -> Mapping[str, Any]:
        """Options of the sources it reads, by source name (each source's ``Options``), from its parameters."""
        return {}

    @staticmethod
    def loss(inputs: LossInputs, params: Any) -> torch.Tensor:
        """The objective's loss before masking and reduction: (b, t) for ``Reduction.TOKEN`` (the runner
        keeps the mask of the first sequence read), (b,) for ``Reduction.SEQUENCE``."""
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


def gold_cross_entropy(student_logits: Logits, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token CE on the gold tokens, (b, t), a piece of positions at a time where the logits are large;
    masked positions give 0 and never index out of range."""
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    return label_nll(student_logits, safe_labels) * mask


def masked_loss_sum(objective: type[Objective], inputs: LossInputs, params: ObjectiveParams) -> torch.Tensor:
    """Σ of the objective's loss over what it is averaged over: the response tokens of its first sequence
    (exactly zero elsewhere, whatever the loss computed there), or its sequences."""
    loss = objective.loss(inputs, params)
    if objective.reduction is Reduction.SEQUENCE:
        return loss.sum()
    mask = inputs[objective.reads[0]].mask
    return torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum()
