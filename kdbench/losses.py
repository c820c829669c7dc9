"""Divergences between the student's and the teacher's next-token distributions, as pure functions.

Each takes the student's and the teacher's logits, (b, t, vocab) in any float dtype, and returns one value
per position, (b, t): the runner masks and averages them (``kdbench.objectives``). ``temperature`` divides
both logits. ``p`` is the teacher's distribution, ``q`` the student's. Everything is computed from
log-softmaxes (mixtures with ``logaddexp``, tails with ``logsumexp``) in float32 or wider, so bf16 and fp16
logits lose nothing more than their own rounding, and a token with zero probability adds ``0·log 0 = 0``.
Every divergence here is ≥ 0 and 0 exactly where the two distributions agree. The objectives built on them, with
their formulas and sources: docs/objectives.md.

Each is ``token_chunked``: logits larger than ``CHUNK_ELEMENTS`` are evaluated a piece of positions at a time,
and recomputed piece by piece in backward, so the float32 temporaries never exist for every token at once. Each
also takes ``HeadLogits`` (hidden states and the LM head's weight) in place of logits and then makes the logits
piece by piece too, so neither they nor their gradient ever exist whole (``training.fused_head``; at GPT-2's
vocabulary and 4,096 tokens the kd loss's peak above its inputs falls from 5.0× one logits tensor to 0.45×, the
gradients included: ``benchmarks/kd_loss_memory.py``). Values and gradients are those of the whole-tensor
evaluation, which stays available as each function's ``__wrapped__``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Divergence = Callable[..., torch.Tensor]  # (student_logits, teacher_logits, *settings) -> (b, t)
Piece = tuple[Any, ...]  # an index into the leading dimensions

# Logits a divergence reads at once (32 MiB of float32). Above it, ``token_chunked`` evaluates the divergence piece
# by piece, so its float32 temporaries (softmaxes, their products, their gradients: several full-vocabulary copies
# per token) exist for one piece at a time; GPT-2's vocabulary fits 166 tokens in a piece.
CHUNK_ELEMENTS = 1 << 23


@dataclass(eq=False)
class HeadLogits:
    """Logits not yet made: a model's last hidden states and its LM head's weight (a linear map without bias), (b, t, d)
    and (vocab, d). The divergences here take them in place of a logits tensor and make the logits a piece of positions
    at a time, in forward and again in backward, so the (b, t, vocab) logits and their gradient never exist whole
    (``sequence_view`` with ``head_dtype``). Gradients reach the hidden states and the weight."""

    hidden: torch.Tensor
    weight: torch.Tensor
    dtype: torch.dtype | None = None  # the logits' (the model's head's under mixed precision); None: the hidden states'
    # While ``recording``, backward passes add Σ‖∂L/∂logits‖² here, piece by piece: the first-step guard's figure
    # (kdbench.train.guards), since there is no logits tensor to take a gradient to.
    recording: bool = False
    gradient_square: torch.Tensor | float = 0.0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))


Logits = torch.Tensor | HeadLogits


def pieces(shape: torch.Size, budget: int) -> list[Piece]:
    """Indexes that cover the leading dimensions of logits of ``shape`` (``(n, vocab)`` or ``(b, t, vocab)``) in
    pieces of at most ``budget`` logits (at least one position each): whole rows of the first dimension where they
    fit, else spans of the second."""
    per_row = math.prod(shape[1:])
    if per_row <= budget or len(shape) < 3:
        rows = max(1, budget // per_row)
        return [(slice(start, start + rows),) for start in range(0, shape[0], rows)]
    span = max(1, budget // math.prod(shape[2:]))
    return [(row, slice(start, start + span)) for row in range(shape[0]) for start in range(0, shape[1], span)]


def _piece(tensor: torch.Tensor, weight: torch.Tensor | None, piece: Piece, dtype: torch.dtype) -> torch.Tensor:
    """One piece of logits: sliced from a logits tensor, or made from hidden states and a head weight."""
    if weight is None:
        return tensor[piece]
    return F.linear(tensor[piece].to(dtype), weight.to(dtype))


class _PieceByPiece(torch.autograd.Function):
    """A divergence evaluated piece by piece that keeps only its inputs for backward (which the model holds anyway)
    and recomputes each piece there: peak memory is the gradient plus one piece's temporaries, instead of every
    temporary at full size. Either side may be ``HeadLogits`` (hidden states and a head weight), whose pieces of
    logits are made from them; the student side's gradient then goes to both. Each position's arithmetic is the
    unchunked one's, so values and gradients agree."""

    @staticmethod
    def forward(ctx: Any, divergence: Divergence, index: list[Piece], record: HeadLogits | None,
                dtypes: tuple[torch.dtype, torch.dtype], student: torch.Tensor, student_weight: torch.Tensor | None,
                other: torch.Tensor, other_weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(student, student_weight, other, other_weight)
        ctx.divergence, ctx.index, ctx.record, ctx.dtypes = divergence, index, record, dtypes
        parts = [divergence(_piece(student, student_weight, piece, dtypes[0]), _piece(other, other_weight, piece, dtypes[1]))
                 for piece in index]
        values = torch.empty(student.shape[:-1], dtype=parts[0].dtype, device=student.device)
        for piece, part in zip(index, parts):
            values[piece] = part
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, student_weight, other, other_weight = ctx.saved_tensors
        grad = torch.empty_like(student)
        weighted = student_weight is not None and ctx.needs_input_grad[5]
        dtype, other_dtype = ctx.dtypes
        # The weight's gradient sums over pieces: in float32 at least, whatever the weight's own dtype.
        wide = torch.promote_types(student_weight.dtype, torch.float32) if weighted else None
        grad_weight = torch.zeros_like(student_weight, dtype=wide) if weighted else None
        for piece in ctx.index:
            with torch.no_grad():
                logits = _piece(student, student_weight, piece, dtype).detach().requires_grad_()
                target = _piece(other, other_weight, piece, other_dtype)
            with torch.enable_grad():
                (grad_logits,) = torch.autograd.grad(ctx.divergence(logits, target), logits, grad_values[piece])
            if ctx.record is not None and ctx.record.recording:
                ctx.record.gradient_square = ctx.record.gradient_square + grad_logits.float().square().sum()
            if student_weight is None:
                grad[piece] = grad_logits
                continue
            # Through the head by hand (F.linear's backward): to the hidden states, and summed into the weight's.
            grad[piece] = (grad_logits @ student_weight.to(dtype)).to(grad.dtype)
            if grad_weight is not None:
                # In place, from pieces widened first: no weight-sized temporary beside the sum.
                grad_weight.addmm_(grad_logits.flatten(0, -2).T.to(wide), student[piece].flatten(0, -2).to(wide))
        return (None, None, None, None, grad, None if grad_weight is None else grad_weight.to(student_weight.dtype),
                None, None)


def _parts(logits: Logits) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
    """(logits or hidden states, head weight or None, the dtype pieces of logits are made in)."""
    if isinstance(logits, HeadLogits):
        return logits.hidden, logits.weight, logits.dtype or logits.hidden.dtype
    return logits, None, logits.dtype


def token_chunked(divergence: Divergence) -> Divergence:
    """``divergence`` evaluated over at most ``CHUNK_ELEMENTS`` logits at a time (see ``_PieceByPiece``); logits that
    fit are passed straight through, and so is a teacher whose logits need a gradient themselves. ``HeadLogits`` on
    either side always go piece by piece (one piece where they fit). The unchunked function stays available as
    ``.__wrapped__``."""

    @functools.wraps(divergence)
    def chunked(student_logits: Logits, teacher_logits: Logits, *args: Any, **kwargs: Any) -> torch.Tensor:
        index = pieces(student_logits.shape, CHUNK_ELEMENTS)
        fused = isinstance(student_logits, HeadLogits) or isinstance(teacher_logits, HeadLogits)
        if not fused and (len(index) == 1 or teacher_logits.requires_grad):
            return divergence(student_logits, teacher_logits, *args, **kwargs)
        student, student_weight, student_dtype = _parts(student_logits)
        teacher, teacher_weight, teacher_dtype = _parts(teacher_logits)
        assert not teacher.requires_grad, "a teacher side whose logits need a gradient is not chunked"
        record = student_logits if isinstance(student_logits, HeadLogits) else None
        return _PieceByPiece.apply(lambda s, t: divergence(s, t, *args, **kwargs), index, record,
                                   (student_dtype, teacher_dtype), student, student_weight, teacher, teacher_weight)

    return chunked


def as_float(logits: torch.Tensor) -> torch.Tensor:
    """The logits in float32, or in their own dtype when that is wider (float64 in tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / τ)`` in float32 or wider. (b, t, vocab)"""
    return F.log_softmax(as_float(logits) / temperature, dim=-1)


def mixture_logp(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log((1 − α)·q + α·p)`` elementwise from log-probabilities, in log space; α = 0 gives ``log_q``. A token
    both rule out (−inf) gets the dtype's lowest finite value: ``logaddexp(−inf, −inf)`` has a NaN gradient."""
    if alpha == 0:
        return log_q
    lowest = torch.finfo(log_q.dtype).min
    return torch.logaddexp(log_q.clamp_min(lowest) + math.log1p(-alpha), log_p.clamp_min(lowest) + math.log(alpha))


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a‖b) = Σ_v a·(log a − log b)`` over the last dimension. Where ``a`` is 0 the term is 0 and passes
    no gradient, even where ``b`` is 0 as well (``−inf − −inf`` would otherwise make a NaN)."""
    a = log_a.exp()
    gap = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * gap).sum(-1)


@token_chunked
def label_nll(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``−log q(label)`` at every position, (b, t), in float32; ``labels`` (b, t) must index the vocabulary everywhere
    (the runner's gold cross-entropy, ``kdbench.objectives.gold_cross_entropy``, masks it)."""
    return -F.log_softmax(student_logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@token_chunked
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p‖q) = Σ_v p·(log p − log q)``: mean-seeking; word-level KD less the teacher's entropy. (b, t)"""
    return kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


@token_chunked
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(q‖p) = Σ_v q·(log q − log p)``: mode-seeking. (b, t)"""
    return kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


@token_chunked
def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Word-level KD, ``Σ_v p(v)·(−log q(v))`` = ``KL(p‖q) + H(p)``, (b, t): the ``kd`` objective's loss, and the
    distillation half of the runner's pre-training LM term. Not zero at ``q = p`` (it is ``H(p)`` there), but
    minimal, with the same gradient as the forward KL."""
    teacher_probs = F.softmax(as_float(teacher_logits) / temperature, dim=-1)  # (b, t, vocab)
    return -(teacher_probs * log_probs(student_logits, temperature)).sum(-1)


@token_chunked
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, scaled: bool = False,
                    temperature: float = 1.0) -> torch.Tensor:
    """TRL GKD's generalised Jensen-Shannon divergence, (b, t): for 0 < β < 1,
    ``β·KL(p‖m) + (1 − β)·KL(q‖m)`` with ``m = β·p + (1 − β)·q``; at the endpoints, as TRL defines them,
    β = 0 is ``KL(p‖q)`` (forward) and β = 1 is ``KL(q‖p)`` (reverse). Inside (0, 1) it tends to 0 at both
    ends, so it is discontinuous there; ``scaled`` divides it by ``β(1 − β)``, which tends to the forward KL
    as β → 0 and to the reverse KL as β → 1: continuous on [0, 1]."""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    if beta == 0:
        return kl_from_log_probs(log_p, log_q)
    if beta == 1:
        return kl_from_log_probs(log_q, log_p)
    log_m = mixture_logp(log_q, log_p, beta)  # (b, t, vocab)
    divergence = beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)
    return divergence / (beta * (1 - beta)) if scaled else divergence


@token_chunked
def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ``½·Σ_v |p − q|``, in [0, 1]. (b, t)"""
    q, p = log_probs(student_logits, temperature).exp(), log_probs(teacher_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


@token_chunked
def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """DistiLLM's skew KL ``KL(p ‖ α·p + (1 − α)·q)``; α = 0 is the forward KL. (b, t)"""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return kl_from_log_probs(log_p, mixture_logp(log_q, log_p, alpha))


@token_chunked
def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """DistiLLM's skew reverse KL ``KL(q ‖ α·q + (1 − α)·p)``; α = 0 is the reverse KL. (b, t)"""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return kl_from_log_probs(log_q, mixture_logp(log_p, log_q, alpha))


@token_chunked
def adaptive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mu: float = 0.5,
                temperature: float = 1.0) -> torch.Tensor:
    """AKL (Wu et al., COLING 2025): ``g_head/(g_head + g_tail)·KL(p‖q) + g_tail/(g_head + g_tail)·KL(q‖p)``.
    The head is the teacher's top tokens holding mass μ (each token whose higher-ranked tokens hold less
    than μ), the tail the rest; ``g = Σ |p − q|`` over each part. The weights pass no gradient, as in DSKD's
    code, where (at μ = 0.5) the split is the same. (b, t)"""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    p = log_p.exp()
    ranked, order = p.sort(dim=-1, descending=True)  # (b, t, vocab)
    head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, ranked.cumsum(-1) - ranked < mu)
    gap = (p - log_q.exp()).abs().detach()
    g_head, g_total = (gap * head).sum(-1), gap.sum(-1)
    head_weight = g_head / g_total.clamp_min(torch.finfo(g_total.dtype).tiny)  # 0 where p = q: both KLs are 0 there
    return head_weight * kl_from_log_probs(log_p, log_q) + (1 - head_weight) * kl_from_log_probs(log_q, log_p)


def _tail_logp(log_probs_: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``log`` of the mass outside the ``top`` tokens, (b, t, 1), summed in log space (exact for a tiny tail)."""
    return log_probs_.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)


@token_chunked
def topk_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 20, tail_bucket: bool = True,
                    temperature: float = 1.0) -> torch.Tensor:
    """Forward KL on the teacher's top-k tokens, what a cached or served teacher can give. With ``tail_bucket``
    the rest of the vocabulary is one more bucket on both sides (TRL's ``loss_add_tail``): the KL between the
    (k + 1)-bucket distributions, equal to ``KL(p‖q)`` when k is the vocabulary size. Without it, the KL
    between both distributions renormalised over the top k. (b, t)"""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    k = min(k, log_p.shape[-1])
    top_log_p, top = log_p.topk(k, dim=-1)  # (b, t, k)
    top_log_q = log_q.gather(-1, top)
    if not tail_bucket:
        return kl_from_log_probs(top_log_p.log_softmax(-1), top_log_q.log_softmax(-1))
    if k == log_p.shape[-1]:  # no tail: its log-mass would be −inf, whose logsumexp has a NaN gradient
        return kl_from_log_probs(top_log_p, top_log_q)
    return kl_from_log_probs(torch.cat([top_log_p, _tail_logp(log_p, top)], -1),
                             torch.cat([top_log_q, _tail_logp(log_q, top)], -1))


def _ab_edge(log_a: torch.Tensor, log_b: torch.Tensor, power: float) -> torch.Tensor:
    """``1/s²·Σ_v [a^s·log(a^s/b^s) − a^s + b^s]``: the α-β divergence where the other exponent is 0
    (a generalised KL between ``a^s`` and ``b^s``; ``KL(a‖b)`` at s = 1)."""
    scaled_a, scaled_b = power * log_a, power * log_b
    return (kl_from_log_probs(scaled_a, scaled_b) + (scaled_b.exp() - scaled_a.exp()).sum(-1)) / power**2


@token_chunked
def alpha_beta_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.2, beta: float = 0.7,
                          temperature: float = 1.0) -> torch.Tensor:
    """ABKD's α-β divergence (Cichocki et al. 2011's AB-divergence), α, β ≥ 0, (b, t):
    ``−1/(αβ)·Σ_v [p^α·q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β)]``, with its continuous limits where an
    exponent is 0: β = 0 gives ``1/α²·Σ [p^α·log(p^α/q^α) − p^α + q^α]`` (α = 1: ``KL(p‖q)``), α = 0 the same
    with p and q swapped (β = 1: ``KL(q‖p)``), α = β = 0 gives ``½·Σ (log p − log q)²``. α trades off
    covering the teacher's modes, β concentrating on the student's."""
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    if alpha == 0 and beta == 0:
        gap = torch.where((log_p > float("-inf")) | (log_q > float("-inf")), log_p - log_q, torch.zeros((), dtype=log_p.dtype))
        return 0.5 * gap.square().sum(-1)
    if beta == 0:
        return _ab_edge(log_p, log_q, alpha)
    if alpha == 0:
        return _ab_edge(log_q, log_p, beta)
    total = alpha + beta
    terms = (alpha * log_p + beta * log_q).exp() - alpha / total * (total * log_p).exp() - beta / total * (total * log_q).exp()
    return -terms.sum(-1) / (alpha * beta)
