"""Guards against silent wrongness: checks that stop a stage whose inputs would make its numbers meaningless.

A teacher that predicts nothing (a uniform output, from zeroed or untrained weights) or something broken (a
non-finite output, or gold tokens no likelier than under a uniform guess: a wrong vocabulary, a wrong
checkpoint) still lets every distillation loss run, and the leaderboard would rank students distilled from
noise. So every training stage that reads a teacher first measures it on a fixed probe batch, logs the
numbers (and records them in the stage's ``train_stats.json``), and refuses to train from such a teacher:
the cells built on that stage are reported ``failed`` with the reason, the rest of the grid goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdbench.data import TokenizedExample
from kdbench.objectives import gold_cross_entropy
from kdbench.train.engine import sequence_view
from kdbench.train.sources import Sequences

LOG = logging.getLogger(__name__)
PROBE_SIZE = 16  # sequences of the probe batch: the first of the validation split, the same for every stage
# Uniform: entropy within 0.1% of log(vocab) (zeroed weights give it exactly). No better than uniform: gold NLL
# within 1% of log(vocab) or above it; a randomly initialised model sits there (its NLL is log(vocab) plus the
# spread of its logits), while two optimizer steps of SFT on the tiny suite already bring it to 0.96 and a
# trained teacher is far below (the tiny suite's shipped teachers: about 0.02).
UNIFORM_ENTROPY_RATIO = 0.999
UNIFORM_NLL_RATIO = 0.99


class BrokenTeacher(RuntimeError):
    """The teacher a stage reads is uniform or broken: the stage (and every cell built on it) fails with this reason."""


@dataclass(frozen=True)
class TeacherProbe:
    """The teacher's next-token statistics on the probe batch's response tokens, in nats."""

    entropy: float  # mean entropy of its next-token distribution
    nll: float  # mean negative log-likelihood of the gold token
    uniform: float  # log(vocabulary size): entropy and NLL of a uniform prediction
    tokens: int  # response tokens measured
    sequences: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self) -> str | None:
        """Why this teacher must not be distilled from, or None when it is healthy."""
        if not (math.isfinite(self.entropy) and math.isfinite(self.nll)):
            return (f"its outputs are not finite on the probe batch (entropy {self.entropy}, NLL {self.nll}): the "
                    "weights hold NaN or inf, or the precision overflows")
        if self.entropy >= UNIFORM_ENTROPY_RATIO * self.uniform:
            return (f"its next-token distribution is uniform: mean entropy {self.entropy:.3f} nats against "
                    f"log(vocab) = {self.uniform:.3f} on {self.tokens} probe tokens (zeroed weights, or a constant output)")
        if self.nll >= UNIFORM_NLL_RATIO * self.uniform:
            return (f"it predicts the data no better than a uniform guess: mean NLL {self.nll:.3f} nats against "
                    f"log(vocab) = {self.uniform:.3f} on {self.tokens} probe tokens (an untrained or wrong "
                    "checkpoint, or a vocabulary that does not match the data's tokenizer)")
        return None


def probe_batch(validation: Sequence[TokenizedExample], train: Sequence[TokenizedExample],
                size: int = PROBE_SIZE) -> list[TokenizedExample]:
    """The fixed probe: the first ``size`` validation sequences (training sequences when there are none), so
    every stage reading a teacher measures it on the same tokens, whatever its seed."""
    return list((validation or train)[:size])


@torch.no_grad()
def probe_teacher(teacher: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int) -> TeacherProbe:
    """Mean entropy and gold NLL of ``teacher`` over the response tokens of ``examples``."""
    if not examples:
        raise ValueError("the teacher probe needs at least one sequence")
    device = next(teacher.parameters()).device
    view = sequence_view(teacher, Sequences.collate(list(examples), pad_id, device), None)
    logits, mask = view.student_logits.float(), view.mask
    log_probs = F.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (b, t); NaN logits stay NaN, so they are caught
    tokens = int(mask.sum())
    mean_entropy = float(entropy[mask].sum()) / max(tokens, 1)
    nll = float(gold_cross_entropy(logits, view.labels, mask).sum()) / max(tokens, 1)
    return TeacherProbe(mean_entropy, nll, math.log(logits.shape[-1]), tokens, len(examples))


def check_teacher(probe: TeacherProbe, teacher: str, stage: str) -> None:
    """Raise ``BrokenTeacher`` naming the teacher, the stage and the fix when the probe says it is unusable."""
    problem = probe.problem()
    if problem is not None:
        raise BrokenTeacher(f"teacher {teacher} is unusable for {stage}: {problem}. Train the teacher (teacher.train: "
                            "true, or a longer teacher.training) or point models.teachers at a trained checkpoint.")


def checked_teacher(teacher: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, label: str,
                    stage: str) -> TeacherProbe:
    """Probe ``teacher`` (named ``label``) on ``examples``, log it, and stop ``stage`` if it is uniform or broken;
    the probe is returned for the stage's ``train_stats.json``."""
    probe = probe_teacher(teacher, examples, pad_id)
    LOG.info("%s: teacher %s on %d probe tokens: entropy %.4f, NLL %.4f, log(vocab) %.4f", stage, label, probe.tokens,
             probe.entropy, probe.nll, probe.uniform)
    check_teacher(probe, label, stage)
    return probe
