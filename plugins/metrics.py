"""Metrics of the papers' protocol: ROUGE-L (``rouge-score``, stemmed F-measure, max over
references) and exact match (normalised string equality, max over references)."""

from __future__ import annotations

from kdbench import Metric, hookimpl
from kdbench.eval.scoring import exact_match, rouge_l

ROUGE_L = Metric("rougeL", "ROUGE-L F-measure (rouge-score, stemmed), max over references", True, rouge_l)
EXACT_MATCH = Metric("exact_match", "normalised exact match (case, punctuation, spaces), max over references", True,
                     exact_match)


@hookimpl
def kdbench_register_metrics() -> list[Metric]:
    return [ROUGE_L, EXACT_MATCH]
