"""The numbers behind a leaderboard row's uncertainty: intervals over training seeds, a row's difference to SFT
paired by training seed, a paired bootstrap over test examples, the share of the teacher–SFT gap a method
recovers, and length buckets.

Two sources of spread, kept apart on purpose:

* Training seeds: each seed's score is the mean over its evaluation seeds; a row's mean, sample standard
  deviation and Student-t 95% interval are taken over those per-seed scores (no interval from one seed).
  Rows of one seed share what the seed draws (under `uniform` its SFT init and data order), so a row's own
  interval carries spread every row shares; its difference to SFT seed by seed does not.
* Test examples: each row's per-example score is averaged over its training and evaluation seeds, and rows
  scored on the same examples are compared on the same bootstrap resamples of them (paired). This measures
  how much a difference could come from which examples were drawn, not from training seeds.

Everything is deterministic: the resamples come from one fixed seed, so the same folder gives the same report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtr, stdtrit  # Student-t distribution and quantiles, without loading all of scipy.stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_GATHER_BUDGET = 4_000_000  # floats gathered per chunk of resamples: bounds memory on large test sets
# Gold-response length in words: DPKD's buckets, (low, high], the last open.
LENGTH_BUCKETS: tuple[tuple[int, float], ...] = ((0, 30), (30, 70), (70, math.inf))

Interval = tuple[float, float]


def bucket_label(low: int, high: float) -> str:
    return f"({low},inf)" if math.isinf(high) else f"({low},{int(high)}]"


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof 1); None for fewer than two values, where it is undefined."""
    return statistics.stdev(values) if len(values) > 1 else None


def t_interval(values: Sequence[float]) -> Interval | None:
    """Student-t interval for the mean of ``values`` at CONFIDENCE; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean, spread = statistics.fmean(values), statistics.stdev(values)
    half = float(stdtrit(len(values) - 1, 0.5 + CONFIDENCE / 2)) * spread / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass(frozen=True)
class SeedPaired:
    """A row's difference to a baseline row on the training seeds both scored, seed by seed."""

    difference: float  # mean over the shared seeds of (row − baseline), in the metric's units
    interval: Interval | None  # Student-t interval of that mean; None from one seed
    p_value: float | None  # two-sided paired t-test; None from one seed or when every seed differs alike
    seeds: int


def seed_paired(row: Mapping[int, float], baseline: Mapping[int, float]) -> SeedPaired | None:
    """``row`` and ``baseline``: training seed → score. None when they share no seed."""
    shared = sorted(set(row) & set(baseline))
    if not shared:
        return None
    differences = [row[seed] - baseline[seed] for seed in shared]
    mean = statistics.fmean(differences)
    p_value = None
    if len(differences) > 1 and (spread := statistics.stdev(differences)) > 0:
        t = mean / (spread / math.sqrt(len(differences)))
        p_value = min(1.0, 2 * float(stdtr(len(differences) - 1, -abs(t))))
    return SeedPaired(mean, t_interval(differences), p_value, len(shared))


def competition_ranks(values: Sequence[float], higher_is_better: bool) -> list[int]:
    """1 + the number of strictly better values: ties share a rank ("1, 2, 2, 4")."""
    sign = 1.0 if higher_is_better else -1.0
    return [1 + sum(sign * other > sign * value for other in values) for value in values]


def bootstrap_means(vectors: np.ndarray) -> np.ndarray:
    """The example mean of each row of ``vectors`` (k × n examples) under the same BOOTSTRAP_RESAMPLES resamples
    of the n examples with replacement: a (resamples × k) array. The same n always gives the same resamples."""
    count, n = vectors.shape
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = np.empty((BOOTSTRAP_RESAMPLES, count))
    chunk = max(1, _GATHER_BUDGET // max(1, count * n))
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        size = min(chunk, BOOTSTRAP_RESAMPLES - start)
        picks = rng.integers(0, n, size=(size, n))
        means[start:start + size] = vectors[:, picks].mean(axis=-1).T
    return means


def percentile_interval(samples: np.ndarray) -> Interval | None:
    """The central CONFIDENCE range of bootstrap ``samples`` (non-finite ones dropped); None when none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """A row against the best row of its (family, student), on the same resampled examples."""

    difference: float  # how far the row is behind the best, in the metric's units (≥ 0 on the observed examples)
    interval: Interval  # percentile bootstrap interval of that difference
    p_value: float  # two-sided: 2 × the share of resamples on the far side of 0, at most 1
    same_as_best: bool  # the interval holds 0: the data do not tell the row from the best


def compare_to_best(best: np.ndarray, other: np.ndarray, observed: float, higher_is_better: bool) -> Comparison:
    """``best`` and ``other``: the two rows' columns of one :func:`bootstrap_means` array; ``observed``: their
    difference on the examples as scored (best − other, sign flipped when lower is better)."""
    behind = (best - other) if higher_is_better else (other - best)
    interval = percentile_interval(behind) or (observed, observed)
    p_value = min(1.0, 2 * min(float(np.mean(behind <= 0)), float(np.mean(behind >= 0))))
    return Comparison(observed, interval, p_value, interval[0] <= 0 <= interval[1])


def gap_recovered(method: float, sft: float, teacher: float) -> float | None:
    """(method − sft) / (teacher − sft): 0 at SFT, 1 at the teacher; None when the teacher does not differ."""
    return None if teacher == sft else (method - sft) / (teacher - sft)


def gap_interval(method: np.ndarray, sft: np.ndarray, teacher: np.ndarray) -> Interval | None:
    """Percentile bootstrap interval of :func:`gap_recovered` over paired resamples (columns of one
    :func:`bootstrap_means` array); resamples where teacher and SFT tie are dropped."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval((method - sft) / (teacher - sft))


def length_buckets(scores: np.ndarray, gold_words: Sequence[int]) -> tuple[dict[str, float | None], dict[str, int]]:
    """Mean of per-example ``scores`` in each gold-length bucket, and the number of examples in each."""
    words = np.asarray(gold_words)
    means: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for low, high in LENGTH_BUCKETS:
        inside = (words > low) & (words <= high)
        label = bucket_label(low, high)
        counts[label] = int(inside.sum())
        means[label] = float(scores[inside].mean()) if inside.any() else None
    return means, counts


def method_text() -> str:
    """How the report's intervals and test are computed, in words (printed under every leaderboard)."""
    percent = f"{CONFIDENCE:.0%}"
    return (
        f"Each training seed's score is the mean over its evaluation seeds; a row shows the mean ± sample standard "
        f"deviation over training seeds and a {percent} Student-t interval over them (none from one training seed). "
        f"'Δ sft by seed': the row's mean difference to the sft row of its (family, student) over the training seeds "
        f"both scored, seed by seed, with a {percent} Student-t interval over the per-seed differences (p: two-sided "
        f"paired t-test). The rows of one seed share what the seed draws (under uniform, its SFT init and data "
        f"order), so this leaves out the spread they share, which each row's own interval keeps. "
        f"Per test example, each row's score is averaged over its training and evaluation seeds; '≈ best' says a "
        f"paired bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples of the test examples with replacement, seed "
        f"{BOOTSTRAP_SEED}, percentile interval) puts 0 inside the {percent} interval of the row's difference to the "
        f"best row of its (family, student) on the primary metric (p: two-sided bootstrap p-value; no correction for "
        f"multiple comparisons). It measures example sampling only, not training-seed spread. Gap recovered = "
        f"(method − sft) / (teacher − sft) on the primary metric, with a {percent} paired bootstrap interval over the "
        f"same resamples. Length buckets: exact match by the gold response's length in words, "
        + ", ".join(bucket_label(low, high) for low, high in LENGTH_BUCKETS) + "."
    )
