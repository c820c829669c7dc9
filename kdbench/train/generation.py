"""Generation: sampled or greedy responses for evaluation and stored teacher samples, and on-policy
samples of the student during training (plain, or from the teacher-mixed distribution of MiniLLM).

Sampling is always from the full distribution: temperature 1, top-k 0, top-p 1. Every random draw
comes from a seed or a generator the caller gives; torch's global generator is left as it was.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig

from kdbench.data import Record, TokenizedExample, format_prompt, prompt_ids
from kdbench.losses import mixture_logp
from kdbench.process import seeded
from kdbench.runtime.watchdog import progress

GREEDY = "greedy"  # the evaluation-seed label of greedy decoding


def batch_progress(observer: Any, stage: str, total: int) -> Callable[[], None]:
    """Announce ``stage`` with ``total`` steps to the observers and return the callback that reports
    each finished generation batch (``on_batch`` of ``generate_responses``)."""
    if observer is not None:
        observer.kdbench_on_stage_start(stage=stage, total=total)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if observer is not None:
            observer.kdbench_on_step_end(stage=stage, step=done, metrics={})

    return advance


def new_token_budget(model: Any, max_new_tokens: int, prompt_width: int) -> int:
    """``max_new_tokens``, capped so prompt + response fit the model's learned positions."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    return max_new_tokens if limit is None else max(0, min(max_new_tokens, int(limit) - prompt_width))


def generation_config(greedy: bool, max_new_tokens: int, eos_id: int, pad_id: int) -> GenerationConfig:
    if greedy:
        return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
    # top_k=0 and top_p=1 switch both filters off: samples come from the model's full distribution.
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_id, pad_token_id=pad_id)


@torch.no_grad()
def generate_responses(model: Any, tokenizer: Any, records: Sequence[Record], seed_label: str, max_new_tokens: int,
                       batch_size: int, on_batch: Callable[[], None] | None = None) -> list[str]:
    """One response per record, in the records' order; text after the first EOS is dropped. Prompts are
    tokenised by ``prompt_ids``, exactly as training tokenises them. Sampling draws from torch's generator
    seeded with ``seed_label`` for the call (``model.generate`` takes no generator of its own) and puts
    the global state back afterwards."""
    model.eval()
    texts = [format_prompt(r) for r in records]
    prompts = [prompt_ids(r, tokenizer) for r in records]
    # Batch prompts of similar length together; results are put back in the original order.
    order = sorted(range(len(prompts)), key=lambda i: len(texts[i]))
    responses: list[str] = [""] * len(prompts)
    with seeded(0 if seed_label == GREEDY else int(seed_label)):
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in indices], tokenizer.pad_token_id, model.device)
            width = input_ids.shape[1]
            budget = new_token_budget(model, max_new_tokens, width)
            config = generation_config(seed_label == GREEDY, budget, tokenizer.eos_token_id, tokenizer.pad_token_id)
            new_tokens = (model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=config)[:, width:] if budget else input_ids[:, :0])
            for i, row in zip(indices, new_tokens.tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                responses[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            progress(f"generated batch {start // batch_size + 1} of {-(-len(order) // batch_size)}")
            if on_batch is not None:
                on_batch()
    return responses


def _cache_argument(model: Any) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; older releases know only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens, so left padding does not shift them. (b, t)"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: generation continues every row from the right edge."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def sample_continuations(model: Any, examples: Sequence[TokenizedExample], max_new_tokens: int, eos_id: int,
                         pad_id: int, max_length: int, generator: torch.Generator) -> list[TokenizedExample]:
    """One sampled response (temperature 1, top-k 0, top-p 1) per example's prompt, from ``model`` as it
    is now: on-policy samples for objectives such as dpkd. Returned as prompt + response + EOS. The draws
    follow ``generator`` (one seed taken from it per call)."""
    was_training = model.training
    model.eval()
    prompts = [e.input_ids[: e.prompt_length] for e in examples]
    input_ids, attention_mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    width = input_ids.shape[1]
    # Training prompts are shorter than the model's positions (max_prompt_length < max_length).
    config = generation_config(False, max(1, new_token_budget(model, max_new_tokens, width)), eos_id, pad_id)
    with seeded(int(torch.randint(2**62, (1,), generator=generator))):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    samples: list[TokenizedExample] = []
    for prompt, row in zip(prompts, output[:, width:].tolist()):
        response = row[: row.index(eos_id)] if eos_id in row else row
        samples.append(TokenizedExample((prompt + response + [eos_id])[:max_length], len(prompt)))
    model.train(was_training)
    return samples


@dataclass
class Rollout:
    """Sampled responses with what the policy gradient needs per response token, each (b, t) and aligned
    with ``input_ids[:, 1:]`` (position i holds the token at i+1 and its probabilities)."""

    input_ids: torch.Tensor  # (b, t) left-padded prompt + sampled response
    attention_mask: torch.Tensor  # (b, t)
    response_mask: torch.Tensor  # (b, t-1) bool: sampled tokens up to and including EOS
    student_logp: torch.Tensor  # (b, t-1) log q_old(y_t) of the student that sampled
    teacher_logp: torch.Tensor  # (b, t-1) log p(y_t)
    mixture_logp: torch.Tensor  # (b, t-1) log of the sampling distribution (1−α)·q + α·p at y_t


def decoding_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Attention kernels for decoding token by token: on a GPU, any but cuDNN's, which plans anew for every shape it
    meets, and every decoding step has a new key length (on an H200, a paper-size rollout took 117 ms a step when its
    shapes were new and 25 ms when they had been seen)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.no_grad()
def sample_mixture(student: Any, teacher: Any, prompts: Sequence[list[int]], alpha: float, max_new_tokens: int,
                   eos_id: int, pad_id: int, generator: torch.Generator) -> Rollout:
    """Sample token by token from ``(1 − α)·q + α·p`` (MiniLLM's teacher-mixed sampling; α = 0 is plain
    student sampling), with KV caches for both models, recording each token's probabilities. Every draw
    comes from ``generator`` (a CPU generator): on the CPU directly; on an accelerator from a generator of the
    device seeded from it once per call, so that the probabilities never leave the device. With α = 0 the draws
    need only the student: the teacher scores the sampled tokens afterwards, in one forward pass over the
    whole sequences instead of one pass per token."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    draws = generator
    if device.type != "cpu":
        draws = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    b = input_ids.shape[0]
    max_new_tokens = max(1, new_token_budget(student, max_new_tokens, input_ids.shape[1]))
    caches: list[Any] = [None, None]
    step_ids = input_ids  # the whole prompt first, then one new token per step
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    records: dict[str, list[torch.Tensor]] = {"token": [], "live": [], "q": [], "p": [], "mix": []}
    stepped = (student, teacher) if alpha > 0 else (student,)
    for _ in range(max_new_tokens):
        positions = positions_from_mask(attention_mask)[:, -step_ids.shape[1]:]
        log_probs = []
        for index, model in enumerate(stepped):
            with decoding_attention(device):
                out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=True, **{_cache_argument(model): caches[index]})
            caches[index] = out["cache"] if "cache" in out else out["past_key_values"]
            log_probs.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))  # (b, vocab)
        log_q = log_probs[0]
        log_mix = mixture_logp(log_q, log_probs[-1], alpha)  # (b, vocab); log_q itself at α = 0
        token = torch.multinomial(log_mix.exp(), 1, generator=draws).squeeze(-1)  # (b,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        records["token"].append(token)
        records["live"].append(~finished)
        tables = {"q": log_q, "mix": log_mix}
        if alpha > 0:
            tables["p"] = log_probs[1]  # with α = 0 the teacher scores the tokens after the loop
        for key, table in tables.items():
            records[key].append(table.gather(-1, token.unsqueeze(-1)).squeeze(-1))
        # The new token is attended iff its row was still live when it was sampled (EOS included).
        attention_mask = torch.cat([attention_mask, (~finished).long().unsqueeze(-1)], dim=-1)
        finished = finished | (token == eos_id)
        step_ids = token.unsqueeze(-1)
        if bool(finished.all()):
            break
    student.train(was_training)
    new_tokens = torch.stack(records["token"], dim=1)  # (b, n)
    if alpha == 0:  # the teacher's log-probability of every sampled token, from one pass over the sequences
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        logits = teacher(input_ids=sequences, attention_mask=attention_mask,
                         position_ids=positions_from_mask(attention_mask)).logits[:, input_ids.shape[1] - 1:-1]
        records["p"] = list(torch.log_softmax(logits.float(), -1).gather(-1, new_tokens.unsqueeze(-1))
                            .squeeze(-1).unbind(1))
    live = torch.stack(records["live"], dim=1)  # (b, n): sampled while the row was unfinished
    prompt_part = torch.zeros((b, input_ids.shape[1] - 1), dtype=torch.bool, device=device)

    def aligned(key: str) -> torch.Tensor:  # (b, t-1), zero over the prompt
        return torch.cat([torch.zeros_like(prompt_part, dtype=torch.float), torch.stack(records[key], dim=1)], dim=1)

    return Rollout(
        input_ids=torch.cat([input_ids, new_tokens], dim=1),
        attention_mask=attention_mask,
        response_mask=torch.cat([prompt_part, live], dim=1),
        student_logp=aligned("q"),
        teacher_logp=aligned("p"),
        mixture_logp=aligned("mix"),
    )
