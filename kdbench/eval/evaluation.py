"""Evaluation as both papers do it: generate a response per test prompt, cut at EOS, score it.

Generation samples with temperature 1, top-k 0 and top-p 1 (the model's full distribution) once
per evaluation seed; greedy decoding is an option. Metrics are plugins (``kdbench.eval.scoring`` holds
ROUGE-L and exact match); each is averaged over examples, ×100, per seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kdbench import distributed
from kdbench.data import Record, format_prompt
from kdbench.eval.scoring import corpus_score
from kdbench.train.generation import batch_progress, generate_responses


@dataclass(frozen=True)
class Metric:
    """A per-example score in [0, 1]; the harness reports its mean over examples × 100."""

    name: str
    description: str
    higher_is_better: bool
    fn: Callable[[str, Sequence[str]], float]


def score(responses: Sequence[str], records: Sequence[Record], metrics: Sequence[Metric]) -> dict[str, float]:
    references = [r["references"] for r in records]
    return {m.name: corpus_score(m.fn, responses, references) for m in metrics}


def score_by_task(responses: Sequence[str], records: Sequence[Record], metrics: Sequence[Metric]) -> dict[str, dict[str, float]]:
    tasks = sorted({str(r.get("task", "")) for r in records})
    breakdown: dict[str, dict[str, float]] = {}
    for task in tasks:
        picked = [i for i, r in enumerate(records) if r.get("task", "") == task]
        breakdown[task or "all"] = score([responses[i] for i in picked], [records[i] for i in picked], metrics)
    return breakdown


def evaluate(model: Any, tokenizer: Any, records: Sequence[Record], metrics: Sequence[Metric], seeds: Sequence[str],
             max_new_tokens: int, batch_size: int, observer: Any = None, stage: str = "eval") -> dict[str, Any]:
    """Scores per seed (``{"rougeL": {"10": 41.2, …}}``), per task and seed, and one sample of outputs.
    Under a multi-process launch each process generates for its share of the records."""
    advance = batch_progress(observer, stage, -(-distributed.shard_size(len(records)) // batch_size) * len(seeds))
    per_seed: dict[str, dict[str, float]] = {m.name: {} for m in metrics}
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    samples: list[dict[str, str]] = []
    started = time.perf_counter()
    for seed_label in seeds:
        responses = distributed.map_sharded(records, lambda share: generate_responses(
            model, tokenizer, share, seed_label, max_new_tokens, batch_size, advance))
        for name, value in score(responses, records, metrics).items():
            per_seed[name][seed_label] = value
        per_task[seed_label] = score_by_task(responses, records, metrics)
        if not samples:
            samples = [{"prompt": format_prompt(r), "response": resp, "reference": r["response"]}
                       for r, resp in zip(records[:20], responses[:20])]
    return {"metrics": per_seed, "per_task": per_task, "samples": samples, "seconds": time.perf_counter() - started}
