"""Paper-size models on a GPU: a few kd training steps and MiniLLM rollouts, with tokens/s and peak memory.

A GPT-2 120M student (width 768, 12 layers) and a GPT-2 760M teacher (width 1280, 36 layers; ``--teacher 1.5b``:
width 1600, 48 layers), both with random weights and GPT-2's vocabulary (50,257), built with the GPT-2 family's
config and saved as HF folders, then trained through kdbench's engine exactly as a paper-scale cell is: kd, bf16,
DeepSpeed ZeRO-1 by default, on synthetic sequences of ``--length`` tokens (half prompt). Then the student samples
MiniLLM rollouts (teacher mix α = 0.2, KV caches for both) from the same prompts. Weights are random, so only the
speed and memory mean anything. Needs a GPU for the default sizes; ``--small`` shrinks everything so the script
can be checked on a CPU. Writes ``benchmarks/results/paper_size-<teacher>[-fused].json``. Run from the repository
root:

    python benchmarks/paper_size.py [--teacher 1.5b] [--fused-head] [--steps 4] [--small] [--profile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from record import RESULTS, machine
from transformers import AutoModelForCausalLM

from kdbench.config import TrainingConfig
from kdbench.data import TokenizedExample
from kdbench.train.engine import TrainingData, train
from kdbench.train.generation import sample_mixture
from kdbench.zoo import TinyArch, count_parameters, load_model
from kdbench_plugins.families import GPT2
from kdbench_plugins.kd import KD

VOCAB = 50257
EOS = PAD = VOCAB - 1  # GPT-2's <|endoftext|>
STUDENT = TinyArch(768, 12, 12)
TEACHERS = {"760m": TinyArch(1280, 36, 20), "1.5b": TinyArch(1600, 48, 25)}
SMALL = TinyArch(64, 2, 2)


def build(arch: TinyArch, positions: int, folder: Path, dtype: torch.dtype) -> int:
    """A random-weight GPT-2 of ``arch`` saved to ``folder``; its parameter count."""
    model = AutoModelForCausalLM.from_config(GPT2.make_config(arch, VOCAB, positions, EOS, PAD)).to(dtype)
    model.save_pretrained(folder)
    return count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="760m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64, help="rollout length")
    parser.add_argument("--engine", choices=["deepspeed", "accelerate"], default="deepspeed")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--fused-head", action="store_true", help="training.fused_head: logits made a piece at a time")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script on a CPU")
    parser.add_argument("--profile", action="store_true", help="then profile one more rollout and print its top operators")
    args = parser.parse_args()
    student_arch, teacher_arch = (SMALL, SMALL) if args.small else (STUDENT, TEACHERS[args.teacher])
    length = 32 if args.small else args.length
    cuda = torch.cuda.is_available()
    weights_dtype = torch.bfloat16 if args.precision == "bf16" and cuda else torch.float32

    generator = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(torch.randint(0, EOS, (length,), generator=generator).tolist(), length // 2)
                for _ in range(args.batch_size * args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {"student": build(student_arch, max(length * 2, 1024), root / "student", torch.float32),
                 "teacher": build(teacher_arch, max(length * 2, 1024), root / "teacher", weights_dtype)}
        device = torch.device("cuda" if cuda else "cpu")
        teacher = load_model(str(root / "teacher"), dtype=weights_dtype, device=device).eval()
        settings = TrainingConfig(engine=args.engine, zero_stage=args.zero_stage, precision=args.precision, lr=1e-4,
                                  batch_size=args.batch_size, max_steps=args.steps, warmup_steps=0,
                                  fused_head=args.fused_head)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        student, stats = train(lambda: load_model(str(root / "student")), KD, KD.make_params({}),
                               TrainingData(examples, PAD, EOS), settings, seed=0, teacher=teacher)
        training = {"tokens_per_second": stats.tokens / stats.seconds, "seconds": stats.seconds,
                    "steps": stats.steps, "final_loss": stats.log[-1]["loss"],
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        student = student.to(device=device, dtype=weights_dtype).eval()
        prompts = [e.input_ids[: e.prompt_length] for e in examples[: args.batch_size]]
        sample_mixture(student, teacher, prompts[:2], 0.2, 4, EOS, PAD, generator)  # warm-up: first calls pay start-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        started = time.perf_counter()
        rollout = sample_mixture(student, teacher, prompts, 0.2, args.new_tokens, EOS, PAD, generator)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        sampling = {"tokens_per_second": int(rollout.response_mask.sum()) / seconds, "seconds": seconds,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as profile:
                sample_mixture(student, teacher, prompts, 0.2, 16, EOS, PAD, generator)
            for column in ("self_cpu_time_total", "self_device_time_total" if cuda else "cpu_time_total"):
                print(profile.key_averages().table(sort_by=column, row_limit=15, max_name_column_width=50))
    record = {"name": "paper_size", "parameters": sizes, "settings": {**vars(args), "length": length}, "kd_training": training,
              "minillm_rollouts": sampling, **machine()}
    print(json.dumps(record, indent=2))
    if not args.small:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"paper_size-{args.teacher}{'-fused' if args.fused_head else ''}.json"
        (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
