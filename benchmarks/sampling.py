"""Sampling throughput of kdbench's KV-cached rollout sampler against ``model.generate`` with the same settings.

MiniLLM's rollouts need, for every sampled token, the student's and the teacher's log-probability of it.
kdbench's ``sample_mixture`` samples token by token with a KV cache for each model and records both as it goes
(α = 0 here: plain student sampling, which ``generate`` can do too). The alternative built on transformers is
``model.generate`` (temperature 1, top-k 0, top-p 1, the same token budget and EOS) followed by one forward pass
of each model over the sampled sequences to score the tokens. dpkd's student samples already are ``generate``
(``sample_continuations``), so they have nothing to compare. Tiny suite models: the shipped GPT-2 teacher and a
fresh student of the suite's size; tokens/s counts sampled response tokens. The two take turns, ``--rounds``
times, each first in turn; medians. Where a GPU is visible both models sample on it and the result is written
as ``sampling_cuda``. Run from the repository root:

    python benchmarks/sampling.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from record import on_device, write_result

from kdbench.data import prompt_ids
from kdbench.registry import load_registries
from kdbench.train.generation import generation_config, left_pad, positions_from_mask, sample_mixture
from kdbench.zoo import build_tiny_model, load_model, load_tokenizer
from kdbench_plugins.families import GPT2

COMMAND = "python benchmarks/sampling.py"
TEACHER = Path(__file__).resolve().parents[1] / "experiments" / "teachers" / "gpt2"

Sampler = Callable[[torch.nn.Module, torch.nn.Module, list[list[int]], int, int, int, torch.Generator], int]


def rollout(student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], budget: int, eos: int,
            pad: int, generator: torch.Generator) -> int:
    """kdbench's rollout; returns the response tokens sampled."""
    sampled = sample_mixture(student, teacher, prompts, 0.0, budget, eos, pad, generator)
    return int(sampled.response_mask.sum())


@torch.no_grad()
def generate_then_score(student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], budget: int,
                        eos: int, pad: int, generator: torch.Generator) -> int:
    """``generate``, then each model scores the sampled tokens in one forward pass; returns the response tokens."""
    input_ids, attention_mask = left_pad(prompts, pad, student.device)
    width = input_ids.shape[1]
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    output = student.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=generation_config(False, budget, eos, pad))
    response = output[:, width:]
    # Live tokens: up to and including each row's first EOS; generate pads the rows that finished early.
    ended = (response == eos).long().cumsum(-1)
    live = (ended == 0) | ((ended == 1) & (response == eos))
    mask = torch.cat([attention_mask, live.long()], dim=-1)
    positions = positions_from_mask(mask)
    for model in (student, teacher):
        logits = model(input_ids=output, attention_mask=mask, position_ids=positions).logits[:, width - 1:-1]
        torch.log_softmax(logits.float(), -1).gather(-1, response.unsqueeze(-1))  # what the rollout records
    return int(live.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts sampled together (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    tokenizer = load_tokenizer(str(TEACHER))
    records = load_registries().datasets.get("tiny").load({"n_train": args.prompts, "n_validation": 1, "n_test": 1})
    prompts = [prompt_ids(record, tokenizer) for record in records["train"][: args.prompts]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(str(TEACHER)).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(GPT2, GPT2.tiny_students["s1"], tokenizer, 64, 0, Path(tmp) / "student")
        student = load_model(str(Path(tmp) / "student")).to(device).eval()
    samplers: dict[str, Sampler] = {"kdbench rollout": rollout, "generate + scoring": generate_then_score}
    runs: dict[str, list[float]] = {name: [] for name in samplers}
    generator = torch.Generator().manual_seed(0)
    for name, sampler in samplers.items():  # warm-up
        sampler(student, teacher, prompts, args.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
    for round_ in range(args.rounds):
        # Each goes first in turn: on a GPU the first to meet a new shape pays for planning its kernels.
        for name, sampler in sorted(samplers.items(), reverse=bool(round_ % 2)):
            started = time.perf_counter()
            tokens = sampler(student, teacher, prompts, args.max_new_tokens, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs[name].append(tokens / (time.perf_counter() - started))
    speed = {name: statistics.median(values) for name, values in runs.items()}
    ratio = speed["kdbench rollout"] / speed["generate + scoring"]
    print(f"{args.prompts} prompts, up to {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} rounds")
    for name, value in speed.items():
        print(f"{name:<22}{value:>10.0f} tokens/s")
    write_result(on_device("sampling", device), ratio, 1.0, ">=", COMMAND, tokens_per_second=speed, runs=runs,
                 prompts=args.prompts, max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    main()
