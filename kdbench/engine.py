"""The training loop: one function, read top to bottom, the same for every objective.

It runs through accelerate, with DeepSpeed (ZeRO stage from the experiment) or plain accelerate.
The runner's share of every loss lives here and nowhere else: shifting, masking, the ``kd_ratio``
mix ``(1 - kd_ratio)·CE_gold + kd_ratio·L_objective`` and normalisation by the global count of response
tokens in an optimizer step.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

if not torch.cuda.is_available():
    # Tell DeepSpeed up front instead of letting it probe and warn on every CPU-only run.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate import Accelerator  # noqa: E402  (after DS_ACCELERATOR is settled)
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402
from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: E402

from kdbench.config import TrainingConfig  # noqa: E402
from kdbench.data import TokenizedExample, collate, length_grouped_batches  # noqa: E402
from kdbench.distributed import launched_world_size  # noqa: E402
from kdbench.generation import Rollout, positions_from_mask, sample_continuations, sample_mixture  # noqa: E402
from kdbench.objectives import (  # noqa: E402
    Need,
    Objective,
    ObjectiveParams,
    PreferencePair,
    RolloutInputs,
    Sequence,
    TokenLossInputs,
    gold_cross_entropy,
    objective_token_loss,
)


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0  # non-padding tokens the student read, all processes
    response_tokens: int = 0  # tokens the loss was taken on, all processes
    student_forwards: int = 0
    teacher_forwards: int = 0
    student_samples: int = 0  # responses sampled from the student during training (on-policy objectives)
    seconds: float = 0.0
    log: list[dict[str, float]] = field(default_factory=list)  # per optimizer step: step, loss, lr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_distributed_env() -> None:
    """DeepSpeed always initialises torch.distributed. ``accelerate launch`` and the deepspeed
    launcher set these variables; a plain single-process ``kdbench run`` gets a world of one."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


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
    # A grid trains many models in one process; each gets a fresh engine with its own settings.
    AcceleratorState._reset_state(reset_partial_state=True)
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
        ensure_distributed_env()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(settings))
        return Accelerator(deepspeed_plugin=plugin, **common)
    # An earlier DeepSpeed engine in this process set this flag for good; the experiment decides.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
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
    if settings.max_steps is not None:
        return settings.max_steps
    assert settings.epochs is not None
    micro_batches_per_epoch = math.ceil(n_examples / settings.batch_size) // world_size
    return max(1, math.ceil(settings.epochs * micro_batches_per_epoch / settings.grad_accum))


def loss_scale(world_size: int, grad_accum: int, global_response_tokens: int) -> float:
    """Factor on a micro-batch's summed token loss so that, after the engine divides by
    ``grad_accum`` and DDP averages over ``world_size`` ranks, the gradient is that of
    sum(all token losses of the optimizer step) / global_response_tokens."""
    return world_size * grad_accum / max(global_response_tokens, 1)


def response_token_count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["response_mask"][:, 1:].sum())


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits shifted so position i predicts token i+1, (b, t-1, vocab). Left-padded batches (rollouts)
    carry their own ``position_ids``."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids")).logits[:, :-1]


def _token_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  teacher: torch.nn.Module | None) -> TokenLossInputs:
    """Student (and teacher) logits shifted so position i predicts token i+1. Logits (b, t-1, vocab)."""
    student_logits = forward_logits(model, batch)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = forward_logits(teacher, batch)
    return TokenLossInputs(student_logits, batch["input_ids"][:, 1:], batch["response_mask"][:, 1:], teacher_logits)


@dataclass
class MicroBatch:
    """The sequences of one micro-batch: the gold ones (for CE), and what the objective reads when it
    is not the gold ones — the teacher's text (seqkd), the preferred side of a pair and a fresh student
    sample as the other side (dpkd), or a batch of teacher-mixed rollouts (minillm)."""

    gold: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor] | None = None
    rejected: dict[str, torch.Tensor] | None = None
    rollout: Rollout | None = None


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each response (b,) and its length in tokens (b,)."""
    logits = forward_logits(model, batch)
    mask = batch["response_mask"][:, 1:]  # (b, t-1)
    token_logp = -gold_cross_entropy(logits, batch["input_ids"][:, 1:], mask)  # (b, t-1), 0 off the mask
    return token_logp.sum(-1), mask.sum(-1)


def objective_count(objective: type[Objective], micro: MicroBatch) -> int:
    """What the objective term is averaged over: pairs for pair objectives, else response tokens."""
    if objective.sequence is Sequence.PAIR:
        return int(micro.gold["input_ids"].shape[0])
    if micro.rollout is not None:
        return int(micro.rollout.response_mask.sum())
    return response_token_count(micro.target if micro.target is not None else micro.gold)


def rollout_loss_sum(model: torch.nn.Module, teacher: torch.nn.Module, objective: type[Objective],
                     params: ObjectiveParams, rollout: Rollout) -> torch.Tensor:
    """Σ of the objective's per-token loss over the sampled tokens of one batch of rollouts."""
    batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
             "position_ids": positions_from_mask(rollout.attention_mask)}
    student_logits = forward_logits(model, batch)  # (b, t-1, vocab)
    with torch.no_grad():
        teacher_logits = forward_logits(teacher, batch)
    inputs = RolloutInputs(student_logits, teacher_logits, rollout.input_ids[:, 1:], rollout.response_mask,
                           rollout.student_logp, rollout.teacher_logp, rollout.mixture_logp)
    loss = objective.rollout_loss(inputs, params)  # (b, t-1)
    return torch.where(rollout.response_mask, loss, torch.zeros((), device=loss.device)).sum()


def batch_loss_sums(model: torch.nn.Module, objective: type[Objective], params: ObjectiveParams,
                    micro: MicroBatch, teacher: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ gold CE over response tokens, Σ objective loss) of one micro-batch.

    When the objective reads the gold sequences, one forward pass serves both terms. With
    ``kd_ratio = 0`` the objective term is not computed at all (sft, and the teacher's own training)."""
    token_objective = objective.sequence in (Sequence.GOLD, Sequence.TEACHER)
    shares_gold = token_objective and micro.target is None
    gold_inputs = _token_inputs(model, micro.gold, teacher if shares_gold else None)
    ce_sum = gold_cross_entropy(gold_inputs.student_logits, gold_inputs.labels, gold_inputs.mask).sum()
    if params.kd_ratio == 0.0:
        return ce_sum, torch.zeros_like(ce_sum)
    if token_objective:
        inputs = gold_inputs if shares_gold else _token_inputs(model, micro.target, teacher)  # type: ignore[arg-type]
        return ce_sum, objective_token_loss(objective, params, inputs).sum()
    if objective.sequence is Sequence.ROLLOUT:
        assert micro.rollout is not None and teacher is not None
        return ce_sum, rollout_loss_sum(model, teacher, objective, params, micro.rollout)
    assert micro.target is not None and micro.rejected is not None and teacher is not None
    student_chosen, chosen_length = sequence_logprobs(model, micro.target)
    student_rejected, rejected_length = sequence_logprobs(model, micro.rejected)
    with torch.no_grad():
        teacher_chosen, _ = sequence_logprobs(teacher, micro.target)
        teacher_rejected, _ = sequence_logprobs(teacher, micro.rejected)
    pair = PreferencePair(student_chosen, teacher_chosen, chosen_length, student_rejected, teacher_rejected,
                          rejected_length)
    return ce_sum, objective.pair_loss(pair, params).sum()


class MicroBatchSource:
    """This rank's micro-batches in training order, each with what the objective reads: the gold
    sequences always; the stored teacher text; a fresh sample of the student as it is now; or
    rollouts, collected in groups and reused for the objective's inner epochs."""

    def __init__(self, examples: list[TokenizedExample], target_examples: list[TokenizedExample] | None,
                 objective: type[Objective], params: ObjectiveParams, batch_size: int, seed: int,
                 accelerator: Accelerator, pad_id: int, eos_id: int | None, sample_max_new_tokens: int,
                 stats: TrainStats) -> None:
        if target_examples is not None:
            assert len(target_examples) == len(examples), "target sequences must pair with the gold ones"
        needs = objective.needs_for(params) if params.kd_ratio > 0 else frozenset()
        if needs & {Need.STUDENT_SAMPLES, Need.ROLLOUTS}:
            assert eos_id is not None, f"{objective.name} samples the student: it needs the EOS id"
        self.examples, self.target_examples = examples, target_examples
        self.objective, self.params = objective, params
        self.samples_student = Need.STUDENT_SAMPLES in needs
        self.uses_rollouts = Need.ROLLOUTS in needs
        self.batch_size, self.accelerator, self.stats = batch_size, accelerator, stats
        self.pad_id, self.eos_id, self.sample_max_new_tokens = pad_id, eos_id, sample_max_new_tokens
        self.lengths = [len(e.input_ids) for e in examples]
        self.max_length = max(self.lengths)
        self.generator = torch.Generator().manual_seed(seed)  # same order on every rank; each takes its share
        self.order: list[list[int]] = []
        self.rollouts: list[tuple[list[int], Rollout]] = []  # queued (prompt indices, their rollouts)

    def batch(self, source: list[TokenizedExample], indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in collate([source[i] for i in indices], self.pad_id).items()}

    def next_prompts(self) -> list[int]:
        """This rank's next micro-batch of training prompts; a new epoch reshuffles."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if len(self.order) < world:  # every rank gets one batch per turn
            self.order = length_grouped_batches(self.lengths, self.batch_size, self.generator)
            self.order = self.order[: len(self.order) - len(self.order) % world]
        turn, self.order = self.order[:world], self.order[world:]
        return turn[rank]

    def collect_rollouts(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
        """Sample rollouts for the next prompts with the student as it is now and queue them for the
        objective's inner epochs, each pass in a new order."""
        spec = self.objective.rollout_spec(self.params)
        assert teacher is not None and self.eos_id is not None
        collected = []
        for _ in range(spec.batches):
            indices = self.next_prompts()
            prompts = [self.examples[i].input_ids[: self.examples[i].prompt_length] for i in indices]
            collected.append((indices, sample_mixture(student, teacher, prompts, spec.teacher_mix,
                                                      self.sample_max_new_tokens, self.eos_id, self.pad_id)))
            self.stats.student_samples += len(indices)
        for _ in range(spec.inner_epochs):
            order = torch.randperm(len(collected), generator=self.generator).tolist()
            self.rollouts.extend(collected[i] for i in order)

    def next(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> MicroBatch:
        rollout = None
        if self.uses_rollouts:
            if not self.rollouts:
                self.collect_rollouts(student, teacher)
            indices, rollout = self.rollouts.pop(0)
        else:
            indices = self.next_prompts()
        micro = MicroBatch(self.batch(self.examples, indices), rollout=rollout)
        if self.target_examples is not None:
            micro.target = self.batch(self.target_examples, indices)
        if self.samples_student:
            assert self.eos_id is not None
            fresh = sample_continuations(student, [self.examples[i] for i in indices], self.sample_max_new_tokens,
                                         self.eos_id, self.pad_id, self.max_length)
            micro.rejected = self.batch(fresh, list(range(len(fresh))))
            self.stats.student_samples += len(fresh)
        return micro


def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute activations in backward (the ``gradient_checkpointing`` setting). transformers 5 calls it
    activation checkpointing; older releases only know the gradient-checkpointing name."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


def train(
    student: torch.nn.Module | Callable[[], torch.nn.Module],
    objective: type[Objective],
    params: ObjectiveParams,
    examples: list[TokenizedExample],
    settings: TrainingConfig,
    seed: int,
    pad_id: int,
    teacher: torch.nn.Module | None = None,
    observer: Any = None,
    stage: str = "train",
    target_examples: list[TokenizedExample] | None = None,
    sample_max_new_tokens: int = 64,
    eos_id: int | None = None,
    tracking: Tracking | None = None,
) -> tuple[torch.nn.Module, TrainStats, Accelerator]:
    """Train ``student`` in place with ``objective``; return the unwrapped model, stats and engine.

    ``student`` may be a function that loads it: it is then called once the engine exists, so that under
    ZeRO-3 ``from_pretrained`` partitions the weights as it loads them instead of every process holding
    the whole model first.

    ``examples`` are the gold sequences; ``target_examples`` (same prompts, same order) are the
    sequences the objective reads when it does not read the gold ones (teacher generations). Objectives
    that need student samples get, for every micro-batch, one fresh sample per prompt from the student
    as it is at that step (up to ``sample_max_new_tokens`` tokens, ending at ``eos_id``). ``tracking``
    logs loss and learning rate of every optimizer step to accelerate's trackers."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    accelerator = make_accelerator(settings, tracking)
    if not isinstance(student, torch.nn.Module):
        student = student()
    if tracking is not None and tracking.trackers:
        accelerator.init_trackers(tracking.name, config=tracking.config)
    if settings.gradient_checkpointing:
        set_activation_checkpointing(student, True)
    world = accelerator.num_processes
    total_steps = total_optimizer_steps(settings, len(examples), world)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, total_steps))
    # The scheduler stays outside accelerate: prepared, it would advance once per process per step.
    model, optimizer = accelerator.prepare(student, optimizer)
    needs_teacher = Need.TEACHER_LOGITS in objective.needs_for(params) and params.kd_ratio > 0
    if needs_teacher:
        assert teacher is not None, f"{objective.name} needs a teacher"
        teacher = teacher.to(accelerator.device).eval()
    stats = TrainStats()
    source = MicroBatchSource(examples, target_examples, objective, params, settings.batch_size, seed,
                              accelerator, pad_id, eos_id, sample_max_new_tokens, stats)
    if observer is not None:
        observer.kdbench_on_stage_start(stage=stage, total=total_steps)
    started = time.perf_counter()
    model.train()

    def global_sum(value: int) -> int:
        return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum").item())

    for step in range(total_steps):
        group = [source.next(accelerator.unwrap_model(model), teacher) for _ in range(settings.grad_accum)]

        # Normalise by the response tokens of the whole optimizer step, across micro-batches and
        # ranks, not per micro-batch: otherwise short-response batches get more weight per token.
        # Each term by its own count: the objective may read other sequences, or average over pairs.
        gold_count = global_sum(sum(response_token_count(micro.gold) for micro in group))
        target_count = global_sum(sum(objective_count(objective, micro) for micro in group))
        # accelerate/DeepSpeed divide the loss by grad_accum and DDP averages gradients over ranks;
        # the scales undo both, so the gradient is exactly that of the step's token means.
        ce_scale = loss_scale(world, settings.grad_accum, gold_count)
        objective_scale = loss_scale(world, settings.grad_accum, target_count)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in group:
            with accelerator.accumulate(model):
                ce_sum, objective_sum = batch_loss_sums(model, objective, params, micro,
                                                        teacher if needs_teacher else None)
                extra_sequences = int(micro.target is not None) + int(micro.rejected is not None) + int(
                    micro.rollout is not None)
                stats.teacher_forwards += max(1, extra_sequences) if needs_teacher else 0
                stats.student_forwards += 1 + (extra_sequences if params.kd_ratio > 0 else 0)
                loss = (1 - params.kd_ratio) * ce_sum * ce_scale + params.kd_ratio * objective_sum * objective_scale
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.engine != "deepspeed":
                    accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)  # DeepSpeed clips from its config
                optimizer.step()  # a no-op until the accumulation boundary (DeepSpeed steps in backward)
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    scheduler.step()
                step_loss += loss.detach() / (world * settings.grad_accum)
                stats.tokens += int(micro.gold["attention_mask"].sum())
        loss_value = float(accelerator.reduce(step_loss, "sum").item())
        stats.response_tokens += gold_count
        record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
        stats.log.append(record)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{stage}: loss became {loss_value} at step {step + 1}; lower the learning rate")
        if observer is not None:
            observer.kdbench_on_step_end(stage=stage, step=step + 1, metrics=record)
        accelerator.log({"train/loss": loss_value, "train/lr": record["lr"]}, step=step + 1)  # no-op without trackers
    for tracker in accelerator.trackers:  # not end_training(): that also tears down the process group
        tracker.finish()
    if settings.gradient_checkpointing:
        set_activation_checkpointing(student, False)  # sampling and evaluation want the KV cache back
    stats.steps = total_steps
    stats.tokens = global_sum(stats.tokens)
    stats.seconds = time.perf_counter() - started
    model.eval()
    # accelerate registers ZeRO-3 with transformers globally; left set, every later from_pretrained in
    # this process would build partitioned (empty) weights.
    unset_hf_deepspeed_config()
    return accelerator.unwrap_model(model), stats, accelerator


def save_trained(model: torch.nn.Module, accelerator: Accelerator, tokenizer: Any, directory: Any) -> None:
    """Write an ordinary HF folder (gathering ZeRO-3 shards first) from the main process only."""
    state_dict = accelerator.get_state_dict(accelerator._models[0]) if accelerator._models else None
    if accelerator.is_main_process:
        model.save_pretrained(directory, state_dict=state_dict)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()
