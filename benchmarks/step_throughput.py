"""Training step throughput: kdbench's engine against a bare PyTorch loop on the same model and batches.

Both train the tiny suite's GPT-2 teacher architecture (width 128, 4 layers) with SFT on the tiny suite's
training split for the same optimizer steps: the same initial weights, the same micro-batches in the same order
(kdbench's length-grouped data order, rebuilt from the same seed), AdamW with the same settings, the same
warm-up-free cosine schedule, gradient clipping at 1.0, and the same loss (cross-entropy over response tokens,
averaged per token). The bare loop is what a user would write by hand: no accelerate, no engine. bf16 runs both
under autocast (accelerate's ``mixed_precision="bf16"`` for kdbench). Where a GPU is visible both train on it
(accelerate places kdbench's model there) and the result is written as ``step_throughput_cuda``. The variants take
turns, ``--rounds`` times after a warm-up round, and each figure is the median; tokens/s counts non-padding tokens.
``--compile`` instead times the bare loop with the model under ``torch.compile`` against the eager loop (one run
each, fp32; ``results/torch_compile.json``). Run from the repository root:

    python benchmarks/step_throughput.py [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from record import RESULTS, machine, on_device, tiny_teacher, write_result

from kdbench.config import TrainingConfig
from kdbench.contracts import PromptOrder, Sequences
from kdbench.data import TokenizedExample
from kdbench.objectives import gold_cross_entropy
from kdbench.train.engine import TrainingData, lr_lambda, train
from kdbench.train.sources import forward_logits
from kdbench.zoo import load_model
from kdbench_plugins.sft import SFT

COMMAND = "python benchmarks/step_throughput.py"
PRECISIONS = ("fp32", "bf16")


def settings(precision: str, steps: int, batch_size: int) -> TrainingConfig:
    return TrainingConfig(engine="accelerate", precision=precision, lr=3e-3, batch_size=batch_size, max_steps=steps,
                          warmup_steps=0)


def kdbench_step(folder: Path, examples: list[TokenizedExample], pad_id: int, config: TrainingConfig) -> float:
    """Tokens/s of kdbench's own training loop, as its stats time it."""
    _, stats = train(load_model(str(folder)), SFT, SFT.make_params({}), TrainingData(examples, pad_id), config, seed=0)
    return stats.tokens / stats.seconds


def bare_steps(folder: Path, examples: list[TokenizedExample], pad_id: int, config: TrainingConfig,
               compiled: bool = False) -> list[tuple[int, float]]:
    """A hand-written loop doing the same optimizer steps on the same micro-batches: (tokens, seconds) of each step.
    ``compiled``: the model under ``torch.compile`` (dynamic shapes, as the batches' lengths vary)."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate puts kdbench's model
    model = load_model(str(folder)).to(device).train()
    forward = torch.compile(model, dynamic=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, config.max_steps or 0))
    order = PromptOrder([len(e.input_ids) for e in examples], config.batch_size, torch.Generator().manual_seed(0), 0, 1,
                        config.length_bucket)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    steps: list[tuple[int, float]] = []
    for _ in range(config.max_steps or 0):
        started = time.perf_counter()
        batch = Sequences.collate([examples[i] for i in order.next()], pad_id, device)
        with autocast:
            logits = forward_logits(forward, batch)
        mask = batch.response_mask[:, 1:]
        loss = gold_cross_entropy(logits, batch.input_ids[:, 1:], mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        float(loss.detach())  # waits for the step, as the engine does when it logs the loss
        steps.append((batch.non_padding_tokens(), time.perf_counter() - started))
    return steps


def tokens_per_second(steps: list[tuple[int, float]]) -> float:
    return sum(tokens for tokens, _ in steps) / sum(seconds for _, seconds in steps)


def bare_loop(folder: Path, examples: list[TokenizedExample], pad_id: int, config: TrainingConfig) -> float:
    """Tokens/s of the hand-written loop."""
    return tokens_per_second(bare_steps(folder, examples, pad_id, config))


def compile_probe(folder: Path, examples: list[TokenizedExample], pad_id: int, config: TrainingConfig) -> dict[str, float]:
    """What ``torch.compile`` would buy the tiny suite: the compiled bare loop's first step (compiling), the seconds of
    the whole run against the eager loop's, and the tokens/s of the steps after the first few (recompiles included)."""
    eager, compiled = bare_steps(folder, examples, pad_id, config), bare_steps(folder, examples, pad_id, config, True)
    return {"first_step_seconds": compiled[0][1], "seconds": sum(s for _, s in compiled),
            "eager_seconds": sum(s for _, s in eager), "later_tokens_per_second": tokens_per_second(compiled[5:]),
            "eager_later_tokens_per_second": tokens_per_second(eager[5:])}


def report_compile(probe: dict[str, float], steps: int) -> None:
    print(f"torch.compile, bare loop, fp32: {probe['seconds']:.1f} s for {steps} steps against eager "
          f"{probe['eager_seconds']:.1f} s (first step {probe['first_step_seconds']:.1f} s); after 5 steps "
          f"{probe['later_tokens_per_second']:.0f} tokens/s against eager {probe['eager_later_tokens_per_second']:.0f}")
    path = RESULTS / on_device("torch_compile", "cuda" if torch.cuda.is_available() else "cpu")
    path.with_suffix(".json").write_text(json.dumps({**probe, "steps": steps, "command": f"{COMMAND} --compile",
                                                     **machine()}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="instead, time the bare loop under torch.compile (fp32) "
                        "against eager, to results/torch_compile.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, examples = tiny_teacher(root)
        if args.compile:
            report_compile(compile_probe(root / "model", examples, tokenizer.pad_token_id,
                                         settings("fp32", args.steps, args.batch_size)), args.steps)
            return
        for precision in PRECISIONS:  # a warm-up round, not counted: on a GPU each batch shape is planned once
            for loop in (kdbench_step, bare_loop):
                loop(root / "model", examples, tokenizer.pad_token_id, settings(precision, args.steps, args.batch_size))
        runs: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for precision in PRECISIONS:
                config = settings(precision, args.steps, args.batch_size)
                for name, loop in (("kdbench", kdbench_step), ("bare", bare_loop)):
                    runs.setdefault(f"{name}-{precision}", []).append(
                        loop(root / "model", examples, tokenizer.pad_token_id, config))
    speed = {label: statistics.median(values) for label, values in runs.items()}
    ratios = {precision: speed[f"kdbench-{precision}"] / speed[f"bare-{precision}"] for precision in PRECISIONS}
    print(f"SFT on the tiny teacher architecture, {args.steps} steps of {args.batch_size} sequences, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds (tokens/s)")
    print(f"{'precision':<11}{'kdbench':>10}{'bare loop':>11}{'ratio':>8}")
    for precision in PRECISIONS:
        print(f"{precision:<11}{speed[f'kdbench-{precision}']:>10.0f}{speed[f'bare-{precision}']:>11.0f}"
              f"{ratios[precision]:>8.2f}")
    print(f"bf16 ÷ fp32: kdbench {speed['kdbench-bf16'] / speed['kdbench-fp32']:.2f}, "
          f"bare loop {speed['bare-bf16'] / speed['bare-fp32']:.2f}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(on_device("step_throughput", device), min(ratios.values()), 0.9, ">=", COMMAND,
                 ratio_is="the lower of fp32 and bf16",
                 ratios=ratios, tokens_per_second=speed, runs=runs, steps=args.steps, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
