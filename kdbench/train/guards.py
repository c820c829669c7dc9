"""Guards against silent wrongness: checks that stop a stage whose inputs would make its numbers meaningless.

A teacher that predicts nothing (a uniform output, from zeroed or untrained weights) or something broken (a
non-finite output, or gold tokens no likelier than under a uniform guess: a wrong vocabulary, a wrong
checkpoint) still lets every distillation loss run, and the leaderboard would rank students distilled from
noise. So every training stage that reads a teacher first measures it on a fixed probe batch, logs the
numbers (and records them in the stage's ``train_stats.json``), and refuses to train from such a teacher.

A distillation term whose gradient is zero (an objective that detaches the student's logits, a student that
starts as the teacher's exact copy, a mask that hides every token) trains the cell by its CE term alone, or
not at all, under the objective's name; the training loop measures that gradient on its first optimizer step
and stops such a stage, unless the objective says why its gradient may vanish at a healthy start
(``Objective.gradient_can_vanish``: then it warns). Either way a stopped stage's cells are reported ``failed``
with the reason, and the rest of the grid goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdbench.contracts import Sequences
from kdbench.data import TokenizedExample
from kdbench.losses import HeadLogits, Logits
from kdbench.objectives import Objective, gold_cross_entropy
from kdbench.train.sources import sequence_view

LOG = logging.getLogger(__name__)
PROBE_SIZE = 16  # sequences of the probe batch: the first of the validation split, the same for every stage
# Uniform: entropy within 0.1% of log(vocab) (zeroed weights give it exactly). No better than uniform: gold NLL
# within 1% of log(vocab) or above it; a randomly initialised model sits there (its NLL is log(vocab) plus the
# spread of its logits), while two optimizer steps of SFT on the tiny suite already bring it to 0.96 and a
# trained teacher is far below (the tiny suite's shipped teachers: about 0.02).
UNIFORM_ENTROPY_RATIO = 0.999
UNIFORM_NLL_RATIO = 0.99
# Dead distillation term: RMS gradient per response token (or sequence) to the logits at or below this. A detached or
# teacher-only term gives exactly 0; forward KL from a student that is the teacher's exact copy gives about 8e-8 (the
# shipped tiny teachers, fp32 and bf16), from rounding alone; on the tiny suite's first steps the six seed methods
# range from about 0.03 (dpkd) through 0.5 (kd) to 1.4 (minillm).
DEAD_GRADIENT_RMS = 1e-6


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


class DeadObjective(RuntimeError):
    """The distillation term gives the student no gradient on the first optimizer step: the stage (and every cell
    built on it) fails with this reason."""


def logit_gradient_square(objective_sum: torch.Tensor, student_logits: Sequence[Logits]) -> torch.Tensor:
    """Σ of the squared gradient of ``objective_sum`` with respect to ``student_logits`` (0 when it does not depend on
    them). Taken to the logits, not the weights: a short backward through the loss alone that reaches no parameter,
    so it is the same under every ZeRO stage and leaves the engine's gradient accumulation untouched. ``HeadLogits``
    have no logits tensor: the backward goes to their hidden states, and the losses, which make the logits a piece at
    a time, add up the squares of the pieces' gradients on the way."""
    zero = torch.zeros((), device=objective_sum.device)
    if not objective_sum.requires_grad:
        return zero
    made = [logits for logits in student_logits if isinstance(logits, HeadLogits)]
    for logits in made:
        logits.recording, logits.gradient_square = True, 0.0
    targets = [logits.hidden if isinstance(logits, HeadLogits) else logits for logits in student_logits]
    gradients = torch.autograd.grad(objective_sum, targets, retain_graph=True, allow_unused=True)
    total = sum((g.float().square().sum() for g, logits in zip(gradients, student_logits)
                 if g is not None and not isinstance(logits, HeadLogits)), zero)
    for logits in made:
        total = total + logits.gradient_square
        logits.recording = False
    return total


def check_objective_gradient(square: float, count: int, objective: type[Objective], stage: str) -> float:
    """The root-mean-square gradient of the first step's distillation term per unit it is averaged over (response
    token or sequence), ``square`` being its squared norm over every process and ``count`` those units. Raise
    ``DeadObjective`` naming the objective, the stage and the likely causes when it is not finite, or zero or at
    rounding level and the objective does not say why it may be (``Objective.gradient_can_vanish``: then a
    warning)."""
    rms = math.sqrt(square / count) if count > 0 else 0.0  # a sum of squares: NaN and inf stay so
    if math.isfinite(rms) and rms > DEAD_GRADIENT_RMS:
        return rms
    what = f"not finite ({square})" if not math.isfinite(rms) else f"{rms:.3g} per unit it averages over"
    said = (f"the gradient of {objective.name}'s distillation term with respect to the student's logits is {what} on "
            f"the first optimizer step of {stage} (at most {DEAD_GRADIENT_RMS:g} is rounding)")
    if math.isfinite(rms) and count > 0 and objective.gradient_can_vanish is not None:
        LOG.warning("%s: %s says why it may be: %s. The cell trains on its other terms until the term wakes.", said,
                    objective.name, objective.gradient_can_vanish)
        return rms
    raise DeadObjective(
        f"{said}, so the term cannot train the student. Causes: the student starts as an exact copy of the teacher "
        "(point the student's init elsewhere), the objective detaches the student's logits or uses only the "
        "teacher's (check its loss), or no response token is under the mask (check the data's max_length and "
        "max_prompt_length).")
