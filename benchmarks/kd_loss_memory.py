"""Peak memory and time of the kd loss forward + backward from the last hidden states: naive, chunked, fused head.

The runner's computation on a batch at GPT-2's vocabulary: student and teacher logits made by their LM heads from
the last hidden states (width 768 each), word-level KD per position (``kdbench.losses.soft_cross_entropy``), masked
and summed, then backward to the student's hidden states and head weight. Three variants on the same inputs:
``naive`` makes both logits whole and evaluates the loss on whole tensors; ``chunked`` makes the logits whole and
evaluates the loss a piece of positions at a time (``token_chunked``: the runner without ``fused_head``); ``fused``
hands the loss ``HeadLogits`` (``training.fused_head``), which makes the logits a piece at a time in forward and
backward. Each variant runs in a fresh process, so its peak resident memory is its own: the peak above what the
process holds once its inputs exist (the gradients it must write are counted), with glibc told to return freed
blocks at once. Then one process evaluates all three on the same inputs and compares values and gradients. The
ratio is fused ÷ naive. Run from the repository root:

    python benchmarks/kd_loss_memory.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from record import on_device, write_result

from kdbench import losses
from kdbench.losses import HeadLogits

COMMAND = "python benchmarks/kd_loss_memory.py"
# glibc serves allocations under a threshold it raises as large blocks are freed (up to 32 MiB) from its heap, and
# keeps freed heap memory resident: the chunked pieces (tens of MiB) would then count long after they are freed. A
# fixed threshold maps every block of 128 KiB or more on its own and unmaps it when freed, so the resident peak is
# the peak of live tensors.
CHILD_ENVIRONMENT = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
VARIANTS = ("naive", "chunked", "fused")
Inputs = dict[str, torch.Tensor]


def inputs(batch: int, length: int, vocab: int, width: int, device: str = "cpu") -> Inputs:
    """Student hidden states and head weight (leaves needing gradients), the teacher's, and a response mask with a
    prompt part."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_(grad)

    mask = torch.ones(batch, length, device=device)
    mask[:, : length // 8] = 0  # the prompt's positions carry no loss
    return {"hidden": draw(batch, length, width, grad=True), "weight": draw(vocab, width, scale=2 / width**0.5, grad=True),
            "teacher_hidden": draw(batch, length, width), "teacher_weight": draw(vocab, width, scale=2 / width**0.5),
            "mask": mask}


def forward_backward(variant: str, x: Inputs) -> tuple[torch.Tensor, ...]:
    """The loss per position, and the gradients of its masked sum to the student's hidden states and head weight."""
    x["hidden"].grad = x["weight"].grad = None
    if variant == "fused":
        values = losses.soft_cross_entropy(HeadLogits(x["hidden"], x["weight"]),
                                           HeadLogits(x["teacher_hidden"], x["teacher_weight"]))
    else:
        with torch.no_grad():
            teacher = F.linear(x["teacher_hidden"], x["teacher_weight"])
        loss = losses.soft_cross_entropy if variant == "chunked" else losses.soft_cross_entropy.__wrapped__
        values = loss(F.linear(x["hidden"], x["weight"]), teacher)
    (values * x["mask"]).sum().backward()
    return values.detach(), x["hidden"].grad, x["weight"].grad


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def peak_bytes(variant: str, batch: int, length: int, vocab: int, width: int, device: str) -> int:
    """In this process: the peak memory one forward + backward adds to its inputs', after a warm-up. On the CPU the
    kernel's resident high-water mark, reset through /proc/self/clear_refs; on a GPU torch's allocator's peak."""
    x = inputs(batch, length, vocab, width, device)
    forward_backward(variant, x)  # warm-up: thread pools and the allocator settle
    x["hidden"].grad = x["weight"].grad = None
    if device != "cpu":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(variant, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from what is resident now
    before = resident_kib("VmRSS")
    forward_backward(variant, x)
    return (resident_kib("VmHWM") - before) * 1024


def seconds(variant: str, x: Inputs) -> float:
    started = time.perf_counter()
    forward_backward(variant, x)
    if x["hidden"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="positions per sequence (batch × length tokens)")
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2's vocabulary")
    parser.add_argument("--width", type=int, default=768, help="hidden width (GPT-2 120M's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to measure on the GPU")
    parser.add_argument("--variant", choices=VARIANTS, help="measure this one here (the parent's child)")
    args = parser.parse_args()
    shape = (args.batch, args.length, args.vocab, args.width)
    if args.variant is not None:
        print(json.dumps(peak_bytes(args.variant, *shape, args.device)))
        return

    measured: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--length",
                                str(args.length), "--vocab", str(args.vocab), "--width", str(args.width), "--device",
                                args.device], capture_output=True, text=True, check=True, env=CHILD_ENVIRONMENT)
        measured[variant] = {"peak_bytes": json.loads(child.stdout.strip().splitlines()[-1])}
    # Values, gradients and time here, with the ordinary allocator; the variants take turns, so all see the same load.
    x = inputs(*shape, args.device)
    naive = [t.clone() for t in forward_backward("naive", x)]
    gaps = {variant: [float((got - want).abs().max()) for got, want in zip(forward_backward(variant, x), naive)]
            for variant in VARIANTS[1:]}
    del naive
    for _ in range(args.repeats):
        for variant in VARIANTS:
            measured[variant].setdefault("runs", []).append(seconds(variant, x))
    for numbers in measured.values():
        numbers["seconds"] = statistics.median(numbers.pop("runs"))

    logits_bytes = args.batch * args.length * args.vocab * x["hidden"].element_size()
    print(f"kd loss forward + backward from hidden states of width {args.width}, {args.batch}×{args.length} tokens × "
          f"{args.vocab} vocabulary, fp32, {args.device} (one logits tensor: {logits_bytes / 2**20:.0f} MiB)")
    print(f"{'variant':<10}{'peak above inputs (MiB)':>26}{'in logits tensors':>20}{'seconds':>10}")
    for variant, numbers in measured.items():
        print(f"{variant:<10}{numbers['peak_bytes'] / 2**20:>26.0f}{numbers['peak_bytes'] / logits_bytes:>20.2f}"
              f"{numbers['seconds']:>10.2f}")
    for variant, (values, hidden, weight) in gaps.items():
        print(f"{variant} against naive, largest difference: values {values:.2e}, gradients {hidden:.2e} (hidden "
              f"states), {weight:.2e} (head weight); must be ≤ 1e-5")
    ratio = measured["fused"]["peak_bytes"] / measured["naive"]["peak_bytes"]
    write_result(on_device("kd_loss_memory", args.device), ratio, 0.3, "<=", COMMAND, stretch_target=0.16,
                 ratio_is="peak memory above the inputs, fused head ÷ naive", tokens=args.batch * args.length,
                 vocab=args.vocab, width=args.width, chunk_elements=losses.CHUNK_ELEMENTS, logits_bytes=logits_bytes,
                 **{variant: numbers for variant, numbers in measured.items()},
                 chunked_ratio=measured["chunked"]["peak_bytes"] / measured["naive"]["peak_bytes"],
                 time_ratio=measured["fused"]["seconds"] / measured["naive"]["seconds"],
                 max_differences=gaps, equal_to_1e_5=all(gap <= 1e-5 for values in gaps.values() for gap in values))


if __name__ == "__main__":
    main()
