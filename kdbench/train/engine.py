"""The training loop: one function, read top to bottom, the same for every objective.

It runs through accelerate, with DeepSpeed (ZeRO stage from the experiment) or plain accelerate.
The runner's share of every loss lives here and nowhere else: running the models on the sequences
an objective reads (``kdbench.train.sources`` makes them), shifting, masking, the ``kd_ratio`` mix
``(1 - kd_ratio)·CE + kd_ratio·L_objective`` (the CE on the sequences ``train_on`` names, gold by default),
the pre-training term ``lm_coef·[(1 − r)·CE + r·word-KD]`` on its own text, and normalisation by the
global count of response tokens (or sequences) in an optimizer step. It also scores the stage on the
validation split every N steps and hands on the best checkpoint, and writes a resume checkpoint every N
steps (``kdbench.train.checkpoints``), from which a killed stage continues exactly as if it had not stopped. On
its first step it stops a stage whose distillation term gives the student no gradient (``kdbench.train.guards``).
It never branches on an objective's name or on the kind of sequence it reads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin

from kdbench import process
from kdbench.config import TrainingConfig
from kdbench.contracts import PromptOrder, Sequences, SequenceSource, SourceContext
from kdbench.data import TokenizedExample
from kdbench.distributed import launched_world_size
from kdbench.losses import Logits
from kdbench.objectives import (
    GOLD,
    Objective,
    ObjectiveParams,
    Reduction,
    SequenceView,
    gold_cross_entropy,
    masked_loss_sum,
    soft_cross_entropy,
)
from kdbench.runtime import say
from kdbench.runtime.extensions import clear_build_locks
from kdbench.runtime.watchdog import progress
from kdbench.train.checkpoints import Resumed, TrainStats, latest_checkpoint, resume_from, save_checkpoint
from kdbench.train.guards import check_objective_gradient, logit_gradient_square
from kdbench.train.sources import MicroBatches, StoredTeacher, plain_head, sequence_view
from kdbench.train.step import SourceClasses, StepPlan, plan_step
from kdbench.train.teacher_outputs import TeacherOutputs


class Diverged(Exception):
    """The loss of a training stage became non-finite: the cell is reported ``diverged`` at ``step``."""

    def __init__(self, stage: str, step: int, loss: float) -> None:
        super().__init__(f"loss became {loss} at optimizer step {step}; lower the learning rate or check the objective")
        self.stage, self.step, self.loss = stage, step, loss


@dataclass(frozen=True)
class Validation:
    """Checkpoint selection for a training stage: ``score(model)`` every ``every`` optimizer steps and at the
    last one; with ``keep_best`` the best-scoring weights are handed on, otherwise the final ones. ``score`` runs
    on every process of a launch (it may generate collectively) with the model in eval mode and no gradients."""

    score: Callable[[torch.nn.Module], float]
    every: int
    higher_is_better: bool
    keep_best: bool = True

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


def deepspeed_config(settings: TrainingConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.grad_clip,
        # ZeRO-3 shards weights; gathering them on save writes an ordinary HF folder.
        "zero_optimization": {"stage": settings.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16", "auto_cast": False},
        "zero_allow_untested_optimizer": True,  # our optimizer is plain torch AdamW
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class Tracking:
    """accelerate trackers (``tensorboard``, ``wandb``) for one training stage: logs go under ``directory``
    as run ``name``. Not part of any cache key: logging does not change the model."""

    trackers: tuple[str, ...]
    directory: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # flat scalars: TensorBoard's hparams take no nesting


def make_accelerator(settings: TrainingConfig, tracking: Tracking | None = None) -> Accelerator:
    """A fresh engine with the stage's settings; call it inside ``process.training_state``."""
    mixed_precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[settings.precision]
    common: dict[str, Any] = {
        "mixed_precision": mixed_precision,
        "gradient_accumulation_steps": settings.grad_accum,
        # Without GPUs, accelerate makes a multi-process launch a gloo group only when told it is on the CPU
        # (a single process keeps DeepSpeed's own communication set-up).
        "cpu": not torch.cuda.is_available() and launched_world_size() > 1,
    }
    if tracking is not None and tracking.trackers:
        common.update(log_with=list(tracking.trackers), project_dir=tracking.directory)
    if settings.engine == "deepspeed":
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed_config(settings)), **common)
    return Accelerator(**common)


def lr_lambda(settings: TrainingConfig, total_steps: int) -> Any:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    warmup = min(settings.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def total_optimizer_steps(settings: TrainingConfig, n_examples: int, world_size: int) -> int:
    """``max_steps``, or ``epochs`` over ``n_examples``; with both, whichever ends first."""
    lengths = [] if settings.max_steps is None else [settings.max_steps]
    if settings.epochs is not None:
        micro_batches_per_epoch = max(1, n_examples // settings.batch_size) // world_size  # full batches only
        lengths.append(max(1, math.ceil(settings.epochs * micro_batches_per_epoch / settings.grad_accum)))
    return min(lengths)


def loss_scale(world_size: int, grad_accum: int, global_response_tokens: int) -> float:
    """Factor on a micro-batch's summed token loss so that, after the engine divides by
    ``grad_accum`` and DDP averages over ``world_size`` ranks, the gradient is that of
    sum(all token losses of the optimizer step) / global_response_tokens."""
    return world_size * grad_accum / max(global_response_tokens, 1)


def objective_count(objective: type[Objective], micro: Mapping[str, Sequences]) -> int:
    """What the objective term of a micro-batch is averaged over: the response tokens, or the sequences,
    of the first sequence it reads."""
    first = micro[objective.reads[0]]
    return len(first) if objective.reduction is Reduction.SEQUENCE else first.response_tokens()


@dataclass(frozen=True)
class LossSums:
    """Σ gold CE over response tokens and Σ objective loss of one micro-batch, and the forward passes it ran."""

    ce: torch.Tensor
    objective: torch.Tensor
    student_forwards: int
    teacher_forwards: int
    student_logits: tuple[Logits, ...] = ()  # of the sequences the objective reads (none with kd_ratio 0)


def batch_loss_sums(model: torch.nn.Module, objective: type[Objective], params: ObjectiveParams, plan: StepPlan,
                    micro: Mapping[str, Sequences], teacher: torch.nn.Module | StoredTeacher | None) -> LossSums:
    """Run the student on every sequence the step reads (the teacher too, or its stored outputs, on the ones the
    objective reads, when it needs teacher logits), then sum both terms. ``micro`` is keyed by role: the GOLD forward
    pass serves the CE term and an objective that reads GOLD alike, and roles one source fills (the same
    ``Sequences``) share one pass; with ``kd_ratio = 0`` only the CE is computed (sft, teachers), with
    ``kd_ratio = 1`` no CE at all (MiniLLM's and DPKD's recipes), so GOLD runs only if the objective reads it. With
    the plan's ``head_dtype`` the logits are ``HeadLogits``, made in that dtype a piece at a time inside the losses
    (``fused_head``)."""
    teacher_roles = set(objective.reads) if teacher is not None and params.kd_ratio > 0 else set()
    roles_run = [role for role in plan.roles if role != GOLD or params.kd_ratio < 1 or GOLD in objective.reads]
    shared: dict[int, list[str]] = {}  # roles by the sequences that fill them
    for role in roles_run:
        shared.setdefault(id(micro[role]), []).append(role)
    views: dict[str, SequenceView] = {}
    teacher_forwards = 0
    for roles in shared.values():
        with_teacher = any(role in teacher_roles for role in roles)
        view = sequence_view(model, micro[roles[0]], teacher if with_teacher else None, plan.head_dtype)
        views.update(dict.fromkeys(roles, view))
        teacher_forwards += with_teacher and isinstance(teacher, torch.nn.Module)
    if GOLD in views:
        gold = views[GOLD]
        ce_sum = gold_cross_entropy(gold.student_logits, gold.labels, gold.mask).sum()
    else:
        ce_sum = torch.zeros((), device=micro[GOLD].input_ids.device)
    if params.kd_ratio == 0:
        return LossSums(ce_sum, torch.zeros_like(ce_sum), len(shared), teacher_forwards)
    read = {id(views[role].student_logits): views[role].student_logits for role in objective.reads}
    return LossSums(ce_sum, masked_loss_sum(objective, views, params), len(shared), teacher_forwards,
                    tuple(read.values()))


@dataclass(frozen=True)
class LmTerm:
    """The pre-training LM term of MiniLLM and DPKD: ``lm_coef · [(1 − r)·CE + r·word-KD]`` on plain-text chunks
    (``r = lm_kd_ratio``; MiniLLM ``minillm/losses.py:198-226``), drawn in an order of their own, beside the
    objective's batches; absent when ``lm_coef`` is 0."""

    settings: TrainingConfig
    text: Sequence[TokenizedExample] | None
    plan: StepPlan  # whether its word-KD half runs the teacher, and the dtype its losses make the logits in

    def __post_init__(self) -> None:
        if self.settings.lm_coef > 0 and not self.text:
            raise ValueError("lm_coef > 0 needs the pre-training chunks (TrainingData.lm_text)")

    def order(self, batch_size: int, seed: int, rank: int, world: int) -> PromptOrder | None:
        if self.settings.lm_coef == 0 or self.text is None:
            return None
        return PromptOrder([len(e.input_ids) for e in self.text], batch_size, torch.Generator().manual_seed(seed + 2),
                           rank, world, self.settings.length_bucket)

    def batch(self, order: PromptOrder, pad_id: int, device: torch.device) -> Sequences:
        assert self.text is not None
        return Sequences.collate([self.text[i] for i in order.next()], pad_id, device)

    def loss_sum(self, model: torch.nn.Module, chunks: Sequences, teacher: torch.nn.Module | None) -> torch.Tensor:
        """Σ over the chunks' tokens of ``(1 − r)·CE + r·word-KD``."""
        view = sequence_view(model, chunks, teacher if self.plan.lm_distils else None, self.plan.lm_head_dtype)
        ratio = self.settings.lm_kd_ratio
        term = (1 - ratio) * gold_cross_entropy(view.student_logits, view.labels, view.mask)
        if view.teacher_logits is not None:
            term = term + ratio * soft_cross_entropy(view.student_logits, view.teacher_logits) * view.mask
        return term.sum()



def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute activations in backward (the ``gradient_checkpointing`` setting). transformers 5 calls it
    activation checkpointing; older releases only know the gradient-checkpointing name."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


@dataclass(frozen=True)
class TrainingData:
    """What a training stage reads: the gold sequences, and the stored teacher samples of the same
    prompts (same order) when a source needs them; the ids and bound sampling needs."""

    examples: Sequence[TokenizedExample]
    pad_id: int
    eos_id: int | None = None
    teacher_texts: Sequence[TokenizedExample] | None = None
    sample_max_new_tokens: int = 64  # bound on every response sampled from the student while training
    lm_text: Sequence[TokenizedExample] | None = None  # pre-training chunks of the LM term (settings.lm_coef > 0)
    # The teacher's stored distributions on ``examples`` (the teacher-outputs stage): read for the gold sequences
    # instead of a teacher forward pass; only for objectives whose teacher logits are all on gold sequences.
    teacher_outputs: TeacherOutputs | None = None


def make_sources(objective: type[Objective], params: ObjectiveParams, plan: StepPlan, registry: SourceClasses,
                 context: SourceContext) -> dict[str, SequenceSource]:
    """One instance of every source the step reads, with the options the objective gives it, by the role it
    fills (one instance may fill two: ``train_on`` naming a source the objective reads as well)."""
    options = objective.source_options(params)
    instances = {name: registry[name](context, options.get(name)) for name in plan.reads}
    return {role: instances[plan.source_of(role)] for role in plan.roles}


def train(
    student: torch.nn.Module | Callable[[], torch.nn.Module],
    objective: type[Objective],
    params: ObjectiveParams,
    data: TrainingData,
    settings: TrainingConfig,
    seed: int,
    teacher: torch.nn.Module | None = None,
    *,
    sources: SourceClasses | None = None,
    observer: Any = None,
    stage: str = "train",
    tracking: Tracking | None = None,
    save_to: Path | None = None,
    tokenizer: Any = None,
    validation: Validation | None = None,
    resume_dir: Path | None = None,
    checkpoint_every: int = 100,
    plan: StepPlan | None = None,
) -> tuple[torch.nn.Module, TrainStats]:
    """Train ``student`` in place with ``objective``; return the unwrapped model and the stats.

    ``student`` may be a function that loads it: it is then called once the engine exists, so that under
    ZeRO-3 ``from_pretrained`` partitions the weights as it loads them instead of every process holding
    the whole model first. ``sources`` are the sequence-source classes by name (default: every installed
    one); ``plan`` is the stage's ``StepPlan`` (the grid's; resolved here from the arguments when None). With
    ``save_to``, the trained model (ZeRO-3 shards gathered) and ``tokenizer`` are written there
    as an ordinary HF folder by the main process. With ``validation`` the stage is scored on the validation
    split as it trains and hands on (returns and saves) the checkpoint the rule selects. A non-finite loss
    raises ``Diverged``. With ``resume_dir`` the stage writes a checkpoint there every ``checkpoint_every``
    optimizer steps and after the last (``save_checkpoint``), and a stage whose ``resume_dir`` holds one continues
    from it: the same arguments give the same model and stats (but ``seconds`` and ``resumed_at``) as an
    uninterrupted run. Whatever the stage changes process-wide is restored on return
    (``process.training_state``)."""
    if sources is None:
        from kdbench.registry import load_registries

        sources = load_registries().sources
    plan = plan or plan_step(objective, params, sources, settings)
    stored = data.teacher_outputs
    assert stored is None or plan.logits_on_gold, \
        f"{objective.name} reads teacher logits on sequences the stored teacher outputs do not cover"
    needs_teacher = plan.uses_teacher(stored_logits=stored is not None)
    lm_term = LmTerm(settings, data.lm_text, plan)
    assert teacher is not None or not needs_teacher, f"{objective.name} needs a teacher"
    if settings.engine == "deepspeed":  # it compiles an op on first use, behind a lock a killed build leaves
        clear_build_locks(say)
    with process.training_state(settings.engine, settings.threads, seed):
        accelerator = make_accelerator(settings, tracking)
        if not isinstance(student, torch.nn.Module):
            student = student()
        if tracking is not None and tracking.trackers:
            accelerator.init_trackers(tracking.name, config=tracking.config)
        if settings.gradient_checkpointing:
            set_activation_checkpointing(student, True)
        world = accelerator.num_processes
        total_steps = total_optimizer_steps(settings, len(data.examples), world)
        optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=settings.betas,
                                      weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, total_steps))
        # The scheduler stays outside accelerate: prepared, it would advance once per process per step.
        model, optimizer = accelerator.prepare(student, optimizer)
        if needs_teacher:
            teacher = teacher.to(accelerator.device).eval()  # type: ignore[union-attr]
        logit_teacher = stored if stored is not None else teacher  # where the objective's teacher logits come from
        if plan.head_dtype is not None or (plan.lm_head_dtype is not None and settings.lm_coef > 0):
            plain_head(model)  # refuses a head the losses cannot make the logits of, before any step
        # Two generators, the same on every process: the data order, and every draw a source makes.
        order = PromptOrder([len(e.input_ids) for e in data.examples], settings.batch_size,
                            torch.Generator().manual_seed(seed), accelerator.process_index, world, settings.length_bucket)
        context = SourceContext(data.examples, data.teacher_texts, order, lambda: accelerator.unwrap_model(model),
                                teacher if needs_teacher else None, accelerator.device, data.pad_id, data.eos_id,
                                data.sample_max_new_tokens, max(len(e.input_ids) for e in data.examples),
                                torch.Generator().manual_seed(seed + 1))
        batches = MicroBatches(context, make_sources(objective, params, plan, sources, context))
        lm_order = lm_term.order(settings.batch_size, seed, accelerator.process_index, world)
        model.train(objective.train_mode(params))  # minillm: eval mode, so sampling and update share one network
        # best_state is kept on the CPU, so selection costs no accelerator memory
        resumed = Resumed(0, TrainStats(), best_value=None, best_state=None)
        checkpoint = None if resume_dir is None else latest_checkpoint(resume_dir)
        if checkpoint is not None:
            resumed = resume_from(checkpoint, accelerator, model, scheduler, batches, lm_order, total_steps)
            resumed.stats.resumed_at.append(resumed.step)
        stats, best_value, best_state = resumed.stats, resumed.best_value, resumed.best_state
        if observer is not None:
            observer.kdbench_on_stage_start(stage=stage, total=total_steps)
        started, seconds_before = time.perf_counter(), stats.seconds

        def global_sum(value: int) -> int:
            return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum").item())

        for step in range(resumed.step, total_steps):
            group = [batches.next() for _ in range(settings.grad_accum)]

            # Normalise by the response tokens of the whole optimizer step, across micro-batches and
            # ranks, not per micro-batch: otherwise short-response batches get more weight per token.
            # Each term by its own count: the objective may read other sequences, or average over pairs.
            gold_count = global_sum(sum(micro[GOLD].response_tokens() for micro in group))
            target_count = global_sum(sum(objective_count(objective, micro) for micro in group))
            # accelerate/DeepSpeed divide the loss by grad_accum and DDP averages gradients over ranks;
            # the scales undo both, so the gradient is exactly that of the step's token means.
            ce_scale = loss_scale(world, settings.grad_accum, gold_count)
            objective_scale = loss_scale(world, settings.grad_accum, target_count)
            # The pre-training term's chunks of this step, normalised by their own global token count.
            lm_batches = [lm_term.batch(lm_order, data.pad_id, accelerator.device) for _ in group] if lm_order else []
            if lm_batches:  # no extra collective per step for the stages without the term
                lm_scale = loss_scale(world, settings.grad_accum, global_sum(sum(b.response_tokens() for b in lm_batches)))
            step_loss = torch.zeros((), device=accelerator.device)
            # A distillation term without gradient would train the cell by CE alone under the objective's name.
            check_gradient = step == 0 and params.kd_ratio > 0
            first_gradient = torch.zeros((), device=accelerator.device)
            for index, micro in enumerate(group):
                with accelerator.accumulate(model):
                    sums = batch_loss_sums(model, objective, params, plan, micro,
                                           logit_teacher if plan.teacher_logits else None)
                    if check_gradient:  # before backward frees the graph
                        first_gradient += logit_gradient_square(sums.objective, sums.student_logits)
                    stats.student_forwards += sums.student_forwards
                    stats.teacher_forwards += sums.teacher_forwards
                    loss = (1 - params.kd_ratio) * sums.ce * ce_scale + params.kd_ratio * sums.objective * objective_scale
                    if lm_batches:
                        loss = loss + settings.lm_coef * lm_term.loss_sum(model, lm_batches[index], teacher) * lm_scale
                        stats.student_forwards += 1
                        stats.teacher_forwards += int(plan.lm_distils)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and settings.engine != "deepspeed":
                        accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)  # DeepSpeed clips from its config
                    optimizer.step()  # a no-op until the accumulation boundary (DeepSpeed steps in backward)
                    optimizer.zero_grad()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    step_loss += loss.detach() / (world * settings.grad_accum)
                    stats.tokens += micro[GOLD].non_padding_tokens()
                    stats.examples += len(micro[GOLD])
            if check_gradient:  # the whole step on every process, since one micro-batch may have no response token
                stats.first_gradient_rms = check_objective_gradient(
                    float(accelerator.reduce(first_gradient, "sum").item()), target_count, objective, stage)
            loss_value = float(accelerator.reduce(step_loss, "sum").item())
            stats.response_tokens += gold_count
            record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
            progress(f"optimizer step {step + 1} of {total_steps}")
            stats.log.append(record)
            if not math.isfinite(loss_value):  # every process sees the same reduced value, so all stop together
                raise Diverged(stage, step + 1, loss_value)
            if observer is not None:
                observer.kdbench_on_step_end(stage=stage, step=step + 1, metrics=record)
            accelerator.log({"train/loss": loss_value, "train/lr": record["lr"]}, step=step + 1)  # no-op without trackers
            if validation is not None and validation.due(step + 1, total_steps):
                value = validate(model, accelerator, validation)
                stats.validation.append({"step": step + 1, "value": value})
                accelerator.log({"validation": value}, step=step + 1)
                # Under "final" the curve is still recorded; only the best rule keeps a copy of the weights.
                if validation.keep_best and validation.better(value, best_value):
                    best_value, stats.selected_step = value, step + 1
                    best_state = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in accelerator.get_state_dict(model).items()}
            if resume_dir is not None and (step + 1 == total_steps or (step + 1) % checkpoint_every == 0):
                stats.seconds = seconds_before + time.perf_counter() - started
                loop_state = {"total_steps": total_steps, "scheduler": scheduler.state_dict(),
                              "batches": batches.state_dict(),
                              "lm_order": None if lm_order is None else lm_order.state_dict(),
                              "stats": dataclasses.asdict(stats), "best_value": best_value}
                save_checkpoint(resume_dir, step + 1, accelerator, loop_state, best_state, stats.selected_step)
        for tracker in accelerator.trackers:  # not end_training(): that also tears down the process group
            tracker.finish()
        if settings.gradient_checkpointing:
            set_activation_checkpointing(student, False)  # sampling and evaluation want the KV cache back
        stats.steps = total_steps
        stats.tokens = global_sum(stats.tokens)
        stats.examples = global_sum(stats.examples)
        stats.student_samples = global_sum(context.counters["student_samples"])
        stats.seconds = seconds_before + time.perf_counter() - started
        if best_state is None or stats.selected_step == total_steps:
            stats.selected_step, best_state = total_steps, None  # the final weights are the selected ones
        model.eval()
        if save_to is not None:
            save_trained(model, accelerator, tokenizer, save_to, best_state)
        trained = accelerator.unwrap_model(model)
        if best_state is not None and settings.zero_stage != 3:  # ZeRO-3 holds shards: the saved folder has the best
            trained.load_state_dict(best_state)
        accelerator.free_memory()  # the engine's optimizer state leaves the GPU before evaluation loads a model
    return trained, stats


def validate(model: torch.nn.Module, accelerator: Accelerator, validation: Validation) -> float:
    """Score the model as it is now; training resumes in the mode it was in, with the process RNG it had
    (sampled validation must not change the training draws that follow)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), process.seeded(0):
        value = float(validation.score(accelerator.unwrap_model(model)))
    model.train(was_training)
    return value


@torch.no_grad()
def validation_loss(model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per response token of ``examples`` under teacher forcing (selection by validation loss)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        view = sequence_view(model, Sequences.collate(examples[start:start + batch_size], pad_id, device), None)
        total += float(gold_cross_entropy(view.student_logits, view.labels, view.mask).sum())
        count += int(view.mask.sum())
        progress(f"validation loss of batch {start // batch_size + 1}")
    return total / max(count, 1)


def save_trained(model: torch.nn.Module, accelerator: Accelerator, tokenizer: Any, directory: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write an ordinary HF folder (gathering ZeRO-3 shards first, unless ``state_dict`` is given) from the main
    process only."""
    if state_dict is None:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()
