"""Wall-time estimates for a plan, so that a budget off by orders of magnitude is seen before it runs.

Each stage's time is its arithmetic at a device's sustained FLOP rate plus a fixed cost per unit of work that
small models never amortise: per micro-batch of training (kernel launches, the optimizer, Python) and per
decoding step of a generated batch. A training step costs 6·P FLOPs a token (forward and backward), a forward
pass of a frozen model 2·P, a decoding step 2·P per sequence. Sequences are counted at ``data.max_length``, an
upper bound. The estimate is meant to be right within a small factor, not to schedule by:
``benchmarks/time_estimate.py`` compares it with the times a results folder recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdbench.config import Experiment
from kdbench.grid.graph import Node, StageKind
from kdbench.grid.specs import TrainSpec

DAY = 86400.0


@dataclass(frozen=True)
class DeviceSpeed:
    """What one process of a device kind sustains."""

    kind: str
    flops: float  # FLOP/s of training and forward passes
    micro_batch_seconds: float  # fixed cost of one micro-batch's forward, backward and share of the optimizer step
    decode_step_seconds: float  # fixed cost of one decoding step of a batch (one new token for every sequence)
    source: str  # where the numbers come from


CPU = DeviceSpeed("cpu", 2e10, 0.15, 0.03, "fitted to results/reference/tiny-all-methods on 2 cores, one thread per "
                  "process (benchmarks/time_estimate.py)")
# GPUs: 40% of the dense bf16 peak (a typical training MFU) and Hugging Face generate's per-token latency; assumed,
# not measured here.
GPUS = {
    "h200": DeviceSpeed("NVIDIA H200", 0.4 * 989e12, 0.05, 0.02, "assumed: 40% of the 989 TFLOP/s bf16 dense peak"),
    "h100": DeviceSpeed("NVIDIA H100", 0.4 * 989e12, 0.05, 0.02, "assumed: 40% of the 989 TFLOP/s bf16 dense peak"),
    "a100": DeviceSpeed("NVIDIA A100", 0.4 * 312e12, 0.05, 0.02, "assumed: 40% of the 312 TFLOP/s bf16 dense peak"),
}


def device_speed(gpu_name: str | None, gpus_asked: bool, paper_scale: bool) -> DeviceSpeed:
    """The device the estimate is for: this machine's GPU when it has one (an unknown kind timed as an A100);
    else an H100 when GPUs are asked for (``--gpus``, a cluster's GPUs per node) or the experiment is at paper
    scale, which no CPU trains; else this machine's CPU."""
    if gpu_name is not None:
        name = gpu_name.lower()
        known = next((speed for kind, speed in GPUS.items() if kind in name), None)
        if known is not None:
            return known
        a100 = GPUS["a100"]
        return DeviceSpeed(gpu_name, a100.flops, a100.micro_batch_seconds, a100.decode_step_seconds,
                           f"an unknown GPU, timed as an A100 ({a100.source})")
    if gpus_asked or paper_scale:
        h100 = GPUS["h100"]
        return DeviceSpeed(h100.kind, h100.flops, h100.micro_batch_seconds, h100.decode_step_seconds,
                           f"no GPU on this machine: the GPUs asked for are timed as H100s ({h100.source})")
    return CPU


def decode_seconds(speed: DeviceSpeed, params: int, sequences: int, batch_size: int, new_tokens: int) -> float:
    """Sampling ``new_tokens`` for ``sequences`` prompts in batches of ``batch_size`` from a ``params`` model."""
    batches = math.ceil(sequences / max(1, batch_size))
    return batches * new_tokens * speed.decode_step_seconds + 2 * params * sequences * new_tokens / speed.flops


def forward_seconds(speed: DeviceSpeed, params: int, sequences: int, batch_size: int, length: int) -> float:
    batches = math.ceil(sequences / max(1, batch_size))
    return batches * speed.micro_batch_seconds / 3 + 2 * params * sequences * length / speed.flops


@dataclass(frozen=True)
class StageWork:
    """What a stage computes, in the units the estimate prices (None: unknown, so no estimate)."""

    student_params: int | None  # the model the stage trains, generates with or evaluates
    teacher_params: int  # a frozen model run alongside it (0: none)
    steps: int | None  # optimizer steps of a training stage
    prompts: int | None  # prompts of a generating stage, training examples of a training one


def stage_seconds(node: Node, work: StageWork, experiment: Experiment, speed: DeviceSpeed, gpus: int,
                  validation_prompts: int | None, eval_seeds: int) -> float | None:
    """Estimated seconds of one stage on ``gpus`` processes of ``speed``; None when its size is unknown."""
    length = experiment.data.max_length
    params, teacher = work.student_params, work.teacher_params
    if node.kind in (StageKind.CHECKPOINT, StageKind.TOKENIZER, StageKind.INIT, StageKind.TOKENIZE):
        return 0.0  # seconds at most, beside the rest
    if params is None:
        return None
    if node.kind is StageKind.EVAL:
        evaluation = experiment.evaluation
        if work.prompts is None:
            return None
        return decode_seconds(speed, params, math.ceil(work.prompts * eval_seeds / gpus), evaluation.batch_size,
                              evaluation.max_new_tokens)
    if node.kind is StageKind.GENERATE:
        settings = experiment.teacher_generations
        if work.prompts is None:
            return None
        return decode_seconds(speed, params, math.ceil(work.prompts / gpus), settings.batch_size,
                              settings.max_new_tokens)
    if node.kind is StageKind.TEACHER_OUTPUTS:
        if work.prompts is None:
            return None
        return forward_seconds(speed, params, work.prompts, experiment.teacher_outputs.batch_size, length)
    assert node.kind is StageKind.TRAIN
    if work.steps is None:
        return None
    spec: TrainSpec = node.spec
    settings, plan, select = spec.settings, spec.plan, spec.select
    micro_batches = work.steps * settings.grad_accum
    tokens = settings.batch_size * length  # per micro-batch and sequence kind
    seconds = micro_batches * (speed.micro_batch_seconds + 6 * params * tokens * len(plan.reads) / speed.flops)
    if teacher:  # its forward passes over the same sequences
        seconds += micro_batches * 2 * teacher * tokens * len(plan.reads) / speed.flops
    new_tokens = experiment.teacher_generations.max_new_tokens
    if plan.samples_student or plan.teacher_samples:  # sampled while training, one batch a micro-batch
        sampler = params + (teacher if plan.teacher_samples else 0)
        seconds += micro_batches * decode_seconds(speed, sampler, settings.batch_size, settings.batch_size, new_tokens)
    checks = work.steps // max(1, select.every)
    if validation_prompts:
        prompts = min(validation_prompts, select.max_examples or validation_prompts)
        each = (forward_seconds(speed, params, prompts, settings.batch_size, length) if select.metric == "loss"
                else decode_seconds(speed, params, prompts, experiment.evaluation.batch_size, select.max_new_tokens))
        seconds += checks * each
    return seconds


def duration(seconds: float | None) -> str:
    """``seconds`` as a person reads a duration: 40 s, 12 min, 3.5 h, 12 days."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} h"
    days = seconds / DAY
    return f"{days:,.0f} days" if days < 1e6 else f"{days:.1e} days"


def over_bound(seconds: float | None, bound_days: float, device: DeviceSpeed, longest: str) -> str | None:
    """Why a grid estimated at ``seconds`` may not start (its bound is ``bound_days``), or None when it may."""
    if seconds is None or seconds <= bound_days * DAY:
        return None
    return (f"the grid's estimated wall time is {duration(seconds)} on {device.kind} ({device.source}), beyond "
            f"runtime.max_estimated_days = {bound_days:g}; the longest stage is {longest}. If this budget is intended, "
            "raise runtime.max_estimated_days in the experiment or pass --allow-long-budget; otherwise look for a "
            "mistyped budget (training.max_steps, epochs, a method's overrides) and check it with "
            "`kdbench run --dry-run`.")
