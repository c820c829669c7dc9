"""Evaluation as both papers do it: generate a response per test prompt, cut at EOS, score it.

Generation samples with temperature 1, top-k 0 and top-p 1 (the model's full distribution) once
per evaluation seed; greedy decoding is an option. Metrics are plugins (``kdbench.contracts.Metric``;
``kdbench.eval.scoring`` holds ROUGE-L and exact match); each is averaged over examples, ×100, per seed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kdbench import distributed
from kdbench.config import config_hash
from kdbench.contracts import Metric
from kdbench.data import Record, format_prompt
from kdbench.eval.scoring import example_scores, mean_times_100
from kdbench.runtime.watchdog import progress
from kdbench.train.generation import batch_progress, generate_responses


def example_facts(records: Sequence[Record]) -> dict[str, Any]:
    """What the report groups examples by: task, the gold response's length in words, the dataset where records
    name one; and a fingerprint of the prompts and references, so rows are paired example by example only when
    they were scored on the same examples."""
    facts: dict[str, Any] = {
        "fingerprint": config_hash([[format_prompt(r), r["references"]] for r in records]),
        "task": [str(r.get("task", "")) for r in records],
        "gold_words": [len(str(r["response"]).split()) for r in records],
    }
    if any(r.get("dataset") for r in records):
        facts["dataset"] = [str(r.get("dataset") or "") for r in records]
    return facts


def _stored(score: float) -> float:
    """A per-example score as examples.json keeps it: ×100 like the corpus scores, 4 decimals, and a whole
    number (exact match's 0 and 100) without its ".0", which halves the file."""
    value = round(100.0 * score, 4)
    return int(value) if value.is_integer() else value


def score_examples(responses: Sequence[str], records: Sequence[Record],
                   metrics: Sequence[Metric]) -> dict[str, list[float]]:
    """Each metric's per-example scores in [0, 1], in the records' order."""
    references = [r["references"] for r in records]
    return {m.name: example_scores(m.fn, responses, references) for m in metrics}


def score_by_task(records: Sequence[Record], per_example: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each task's corpus scores ("all" when the records name no task)."""
    tasks = sorted({str(r.get("task", "")) for r in records})
    breakdown: dict[str, dict[str, float]] = {}
    for task in tasks:
        picked = [i for i, r in enumerate(records) if r.get("task", "") == task]
        breakdown[task or "all"] = {name: mean_times_100([scores[i] for i in picked])
                                    for name, scores in per_example.items()}
    return breakdown


def evaluate(model: Any, tokenizer: Any, records: Sequence[Record], metrics: Sequence[Metric], seeds: Sequence[str],
             max_new_tokens: int, batch_size: int, observer: Any = None, stage: str = "eval") -> dict[str, Any]:
    """Scores per seed (``{"rougeL": {"10": 41.2, …}}``), per task and seed, one sample of outputs, and every
    example's scores per metric and seed with the examples' facts (``examples``: a schema ``ExampleSet``).
    Under a multi-process launch each process generates for its share of the records."""
    advance = batch_progress(observer, stage, -(-distributed.shard_size(len(records)) // batch_size) * len(seeds))
    per_seed: dict[str, dict[str, float]] = {m.name: {} for m in metrics}
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    examples = {**example_facts(records), "scores": {m.name: {} for m in metrics}}
    samples: list[dict[str, str]] = []
    started = time.perf_counter()
    for seed_label in seeds:
        responses = distributed.map_sharded(records, lambda share: generate_responses(
            model, tokenizer, share, seed_label, max_new_tokens, batch_size, advance))
        per_example = score_examples(responses, records, metrics)
        for name, scores in per_example.items():
            per_seed[name][seed_label] = mean_times_100(scores)
            examples["scores"][name][seed_label] = [_stored(value) for value in scores]
        per_task[seed_label] = score_by_task(records, per_example)
        progress(f"scored sampling seed {seed_label}")
        if not samples:
            samples = [{"prompt": format_prompt(r), "response": resp, "reference": r["response"]}
                       for r, resp in zip(records[:20], responses[:20])]
    return {"metrics": per_seed, "per_task": per_task, "samples": samples, "examples": examples,
            "seconds": time.perf_counter() - started}
