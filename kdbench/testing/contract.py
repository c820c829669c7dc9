"""``objective_contract``: what every objective, built-in or third-party, must do, checked on real tiny models.

1. Its declared needs suffice: one optimizer step through the real engine, given exactly what the objective
   and the sources it reads declare (the teacher only if they use it, stored teacher texts only if a source
   reads them), gives a finite loss.
2. On one micro-batch made by the real sources, the runner's masked loss is finite, and so are its gradients
   in the student's weights, which are not all zero; and the engine's first-step guard found the gradient of
   its distillation term above rounding (``kdbench.train.guards``).
3. Masked positions are ignored: logits, labels and recorded values there can be anything.
4. It works on bf16 logits: finite, with finite gradients, and close to its fp32 value.
5. Where the student equals the teacher (the student *is* a copy of the teacher, so even the values its
   sources record agree), what ``Objective.at_teacher`` declares: zero gradient in the student's logits;
   for ``MINIMUM`` and ``ZERO`` no perturbation lowers it; for ``ZERO`` it is 0 there and ≥ 0 at every
   position elsewhere.
6. If it declares ``fused_head``, on ``HeadLogits`` (hidden states and the LM head, the logits made a piece at a
   time) its masked loss and the gradient in the student's weights are those on whole logits.

With ``kd_ratio = 0`` the runner never computes the loss (``sft``): only the engine step applies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from kdbench.config import TrainingConfig
from kdbench.contracts import PromptOrder, SequenceSource, SourceContext
from kdbench.objectives import (
    AtTeacher,
    LossInputs,
    Objective,
    ObjectiveParams,
    Reduction,
    SequenceView,
    masked_loss_sum,
)
from kdbench.registry import load_registries
from kdbench.testing.kit import SAMPLE_TOKENS, TinyKit, default_kit
from kdbench.train.engine import make_sources, train
from kdbench.train.guards import DeadObjective
from kdbench.train.sources import MicroBatches, sequence_view
from kdbench.train.step import plan_step, step_reads

BATCH = 4  # prompts per micro-batch
# One optimizer step of BATCH prompts on the CPU: the settings of every engine step the contract takes.
SETTINGS = TrainingConfig(engine="accelerate", lr=1e-3, warmup_steps=0, batch_size=BATCH, max_steps=1, threads=1)
Sources = Mapping[str, type[SequenceSource]]


def objective_contract(objective: type[Objective], kit: TinyKit | None = None, params: ObjectiveParams | None = None,
                       sources: Sources | None = None) -> None:
    """Check ``objective`` (with ``params``, default: its defaults) against the contract above; raise an
    ``AssertionError`` naming the objective and the property it breaks. ``kit``: the ``kdbench_kit`` fixture
    (default: one built once per process in a temporary folder); ``sources``: the sequence-source classes by
    name (default: every installed one)."""
    kit = kit or default_kit()
    params = params if params is not None else objective.make_params({})
    if sources is None:
        registry = load_registries().sources
        sources = {name: registry.get(name) for name in registry}
    dead = check_declared_needs_suffice(objective, params, kit, sources)
    if params.kd_ratio == 0:
        return
    teacher = kit.teacher()
    student = kit.student().eval()  # one network for the sampling and the loss, as at the first step
    inputs = loss_inputs(objective, params, kit, student, teacher, sources)
    check_finite_with_gradient(objective, params, inputs, student)  # says why more precisely than the guard, if it can
    assert dead is None, f"{_where(objective)}: the engine stopped its first step: {dead}"
    fixed = {role: _detached(view) for role, view in inputs.items()}
    check_masked_positions_ignored(objective, params, fixed)
    check_bf16(objective, params, fixed)
    if objective.at_teacher is not None:
        at_teacher = loss_inputs(objective, params, kit, kit.teacher(), teacher, sources)  # the student is the teacher
        check_at_teacher(objective, params, at_teacher, fixed)
    if objective.fused_head:
        check_fused_head(objective, params, kit, student, teacher, sources)


def _where(objective: type[Objective]) -> str:
    return f"objective {objective.name!r} ({objective.__module__}.{objective.__qualname__})"


def check_declared_needs_suffice(objective: type[Objective], params: ObjectiveParams, kit: TinyKit,
                                 sources: Sources) -> str | None:
    """One optimizer step through the engine with exactly what the objective and its sources declare; the engine's
    reason when it ran but found the distillation term's gradient dead (``DeadObjective``), for the caller to report
    after the checks that can say more precisely why."""
    reads = step_reads(objective, params)
    unknown = [name for name in reads if name not in sources]
    assert not unknown, f"{_where(objective)} reads sequence sources nobody registers: {unknown}"
    plan = plan_step(objective, params, sources, SETTINGS)
    try:
        _, stats = train(kit.student(), objective, params, kit.training_data(with_teacher_texts=plan.teacher_generations),
                         SETTINGS, 0, kit.teacher() if plan.uses_teacher(stored_logits=False) else None, sources=sources,
                         plan=plan)
    except DeadObjective as error:
        return str(error)
    except Exception as error:
        declared = sorted(need.value for need in objective.needs_for(params))
        raise AssertionError(f"{_where(objective)}: one engine step given exactly what it declares (needs {declared}, "
                             f"reads {list(reads)}) failed: {type(error).__name__}: {error}") from error
    assert math.isfinite(stats.log[0]["loss"]), f"{_where(objective)}: the engine step's loss is {stats.log[0]['loss']}"
    return None


def loss_inputs(objective: type[Objective], params: ObjectiveParams, kit: TinyKit, student: torch.nn.Module,
                teacher: torch.nn.Module, sources: Sources, head_dtype: torch.dtype | None = None) -> dict[str, SequenceView]:
    """One micro-batch of the sequences the objective reads, made by the real sources with ``student`` as the
    sampling student, and the views the runner would hand its loss (teacher logits where it needs them; ``HeadLogits``
    made in ``head_dtype`` when given)."""
    tokenizer, examples = kit.tokenizer, kit.examples
    order = PromptOrder([len(e.input_ids) for e in examples], BATCH, torch.Generator().manual_seed(0), 0, 1, 1)
    context = SourceContext(examples, kit.teacher_texts, order, lambda: student, teacher, torch.device("cpu"),
                            tokenizer.pad_token_id, tokenizer.eos_token_id, SAMPLE_TOKENS,
                            max(len(e.input_ids) for e in examples), torch.Generator().manual_seed(1))
    plan = plan_step(objective, params, sources, SETTINGS)
    micro = MicroBatches(context, make_sources(objective, params, plan, sources, context)).next()
    with_teacher = teacher if plan.teacher_logits else None
    return {role: sequence_view(student, micro[role], with_teacher, head_dtype) for role in objective.reads}


def _detached(view: SequenceView) -> SequenceView:
    return dataclasses.replace(view, student_logits=view.student_logits.detach())


def _with_logits(view: SequenceView, student: torch.Tensor, teacher: torch.Tensor | None = None) -> SequenceView:
    """``view`` with other student logits (and teacher logits, when given)."""
    teacher = teacher if teacher is not None else view.teacher_logits
    return dataclasses.replace(view, student_logits=student, teacher_logits=teacher)


def _units(objective: type[Objective], inputs: LossInputs) -> int:
    """What the runner averages the loss over: the first view's response tokens, or its sequences."""
    first = inputs[objective.reads[0]]
    return len(first.mask) if objective.reduction is Reduction.SEQUENCE else int(first.mask.sum())


def check_finite_with_gradient(objective: type[Objective], params: ObjectiveParams, inputs: LossInputs,
                               student: torch.nn.Module) -> None:
    total = masked_loss_sum(objective, inputs, params)
    assert torch.isfinite(total), f"{_where(objective)}: the masked loss is {total.item()}"
    assert total.requires_grad, f"{_where(objective)}: the loss is detached from the student's logits; it trains nothing"
    student.zero_grad()
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads, f"{_where(objective)}: no gradient reaches the student's weights"
    assert all(torch.isfinite(g).all() for g in grads), f"{_where(objective)}: non-finite gradients in the student's weights"
    assert any(g.abs().sum() > 0 for g in grads), f"{_where(objective)}: every gradient is zero; the loss trains nothing"


def _scrambled(view: SequenceView, generator: torch.Generator) -> SequenceView:
    """Anything at the masked positions: random logits of scale 5, random in-vocabulary labels, random
    recorded log-probabilities."""
    off = ~view.mask  # (b, t)

    def noise(tensor: torch.Tensor) -> torch.Tensor:
        return torch.where(off[..., None], 5 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype), tensor)

    vocab = view.student_logits.shape[-1]
    labels = torch.where(off, torch.randint(0, vocab, view.labels.shape, generator=generator), view.labels)
    extras = {name: torch.where(off, -3 * torch.rand(value.shape, generator=generator, dtype=value.dtype), value)
              for name, value in view.extras.items()}
    teacher = None if view.teacher_logits is None else noise(view.teacher_logits)
    return SequenceView(noise(view.student_logits), labels, view.mask, teacher, extras)


def check_masked_positions_ignored(objective: type[Objective], params: ObjectiveParams, inputs: LossInputs) -> None:
    generator = torch.Generator().manual_seed(2)
    scrambled = {role: _scrambled(view, generator) for role, view in inputs.items()}
    expected, got = masked_loss_sum(objective, inputs, params), masked_loss_sum(objective, scrambled, params)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (
        f"{_where(objective)}: changing only masked positions moved the masked loss from {expected.item()} to {got.item()}")


def check_bf16(objective: type[Objective], params: ObjectiveParams, inputs: LossInputs) -> None:
    """Logits in bf16, as a bf16 run's models give them: finite, finite gradients, near the fp32 value
    (within 1% plus 0.01 per unit averaged over; rounding the kit's logits to bf16 moves the built-in
    objectives by at most 0.003 per unit)."""
    reference = masked_loss_sum(objective, inputs, params).item()
    half = {role: _with_logits(view, view.student_logits.to(torch.bfloat16).requires_grad_(),
                               None if view.teacher_logits is None else view.teacher_logits.to(torch.bfloat16))
            for role, view in inputs.items()}
    total = masked_loss_sum(objective, half, params)
    assert torch.isfinite(total), f"{_where(objective)}: on bf16 logits the masked loss is {total.item()}"
    total.backward()
    for view in half.values():
        grad = view.student_logits.grad
        assert grad is None or torch.isfinite(grad).all(), f"{_where(objective)}: non-finite gradients on bf16 logits"
    value, tolerance = total.item(), 0.01 * abs(reference) + 0.01 * _units(objective, inputs)
    assert abs(value - reference) <= tolerance, (
        f"{_where(objective)}: on bf16 logits the masked loss is {value}, in fp32 {reference}")


def check_at_teacher(objective: type[Objective], params: ObjectiveParams, at_teacher: LossInputs, elsewhere: LossInputs) -> None:
    """``at_teacher``: views whose student is the teacher; ``elsewhere``: views of another student."""
    where, kind = _where(objective), objective.at_teacher
    leaves = {role: _with_logits(view, view.student_logits.detach().requires_grad_()) for role, view in at_teacher.items()}
    total = masked_loss_sum(objective, leaves, params)
    total.backward()
    value = total.item()
    for role, view in leaves.items():
        grad = view.student_logits.grad
        largest = 0.0 if grad is None else float(grad.abs().max())
        assert largest <= 1e-4, f"{where} declares at_teacher={kind.value}, but where the student is the teacher its " \
                                f"gradient in the student's logits ({role}) reaches {largest}"
    units = _units(objective, at_teacher)
    if kind is AtTeacher.ZERO:
        assert abs(value) <= 1e-5 * units, f"{where} declares at_teacher=zero, but its loss there is {value}"
        per_position = objective.loss(elsewhere, params)
        if objective.reduction is Reduction.TOKEN:
            per_position = per_position[elsewhere[objective.reads[0]].mask]
        lowest = float(per_position.min())
        assert lowest >= -1e-5, f"{where} declares at_teacher=zero (a divergence), but a position's loss is {lowest} < 0"
    if kind in (AtTeacher.ZERO, AtTeacher.MINIMUM):
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            moved = {role: _with_logits(view, view.student_logits.detach()
                                        + torch.randn(view.student_logits.shape, generator=generator))
                     for role, view in leaves.items()}
            perturbed = masked_loss_sum(objective, moved, params).item()
            assert perturbed >= value - 1e-5 * units, (
                f"{where} declares at_teacher={kind.value}, but moving the student away from the teacher lowers its "
                f"loss from {value} to {perturbed}")


def check_fused_head(objective: type[Objective], params: ObjectiveParams, kit: TinyKit, student: torch.nn.Module,
                     teacher: torch.nn.Module, sources: Sources) -> None:
    """The same micro-batch with whole logits and with ``HeadLogits``: the same masked loss and weight gradients."""
    sums: list[torch.Tensor] = []
    gradients: list[list[torch.Tensor]] = []
    for head_dtype in (None, torch.float32):
        inputs = loss_inputs(objective, params, kit, student, teacher, sources, head_dtype)
        try:
            total = masked_loss_sum(objective, inputs, params)
        except Exception as error:
            raise AssertionError(f"{_where(objective)} declares fused_head, but its loss fails on HeadLogits: "
                                 f"{type(error).__name__}: {error}; read the logits through kdbench.losses only, or "
                                 "leave fused_head False") from error
        weights = [p for p in student.parameters() if p.requires_grad]
        sums.append(total.detach())
        gradients.append([torch.zeros_like(p) if g is None else g
                          for p, g in zip(weights, torch.autograd.grad(total, weights, allow_unused=True))])
    assert torch.allclose(sums[1], sums[0], rtol=1e-5, atol=1e-6), (
        f"{_where(objective)} declares fused_head, but on HeadLogits its masked loss is {sums[1].item()}, on whole "
        f"logits {sums[0].item()}")
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(gradients[1], gradients[0])), (
        f"{_where(objective)} declares fused_head, but on HeadLogits its gradient in the student's weights differs")
