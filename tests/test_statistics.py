"""The report's statistics on numbers worked out by hand: intervals over training seeds, differences paired by
training seed, ranks, the paired bootstrap over test examples, the gap recovered and length buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdbench.report import statistics as stats


def test_std_and_t_interval_over_training_seeds() -> None:
    values = [41.0, 45.0, 43.0]
    assert stats.sample_std(values) == pytest.approx(2.0)
    half = scipy_stats.t.ppf(0.975, df=2) * 2.0 / math.sqrt(3)  # 4.303 × 2 / √3
    assert stats.t_interval(values) == pytest.approx((43.0 - half, 43.0 + half))
    assert stats.sample_std([41.0]) is None and stats.t_interval([41.0]) is None  # one training seed: undefined


def test_seed_paired_difference_is_a_paired_t_test_over_the_shared_seeds() -> None:
    row = {0: 41.0, 1: 45.0, 2: 43.0}
    baseline = {0: 40.0, 1: 43.0, 2: 42.0, 3: 50.0}  # seed 3 has no partner and is left out
    paired = stats.seed_paired(row, baseline)
    assert paired is not None and paired.seeds == 3
    differences = [1.0, 2.0, 1.0]
    assert paired.difference == pytest.approx(4 / 3)
    half = scipy_stats.t.ppf(0.975, df=2) * np.std(differences, ddof=1) / math.sqrt(3)
    assert paired.interval == pytest.approx((4 / 3 - half, 4 / 3 + half))
    assert paired.p_value == pytest.approx(scipy_stats.ttest_rel([41.0, 45.0, 43.0], [40.0, 43.0, 42.0]).pvalue)
    one = stats.seed_paired({0: 41.0}, baseline)
    assert one is not None and (one.difference, one.interval, one.p_value, one.seeds) == (1.0, None, None, 1)
    assert stats.seed_paired({5: 41.0}, baseline) is None


def test_seed_paired_difference_leaves_out_the_spread_the_seeds_share() -> None:
    """Seeds 10 points apart that move both rows alike: each row's own interval is wide, the paired one is not."""
    shared = {0: 30.0, 1: 40.0, 2: 50.0}
    row = {seed: value + 0.5 for seed, value in shared.items()}
    own = stats.t_interval(list(row.values()))
    assert own is not None and own[1] - own[0] > 40
    paired = stats.seed_paired(row, shared)
    assert paired is not None and paired.difference == pytest.approx(0.5)
    assert paired.interval == pytest.approx((0.5, 0.5)) and paired.p_value is None  # no spread left to test against


def test_competition_ranks_share_ties() -> None:
    assert stats.competition_ranks([40.0, 45.0, 45.0, 30.0], higher_is_better=True) == [3, 1, 1, 4]
    assert stats.competition_ranks([40.0, 45.0, 30.0], higher_is_better=False) == [2, 3, 1]


def test_bootstrap_means_are_paired_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 100, size=200)
    vectors = np.stack([base, base + 5.0])
    first, second = stats.bootstrap_means(vectors), stats.bootstrap_means(vectors)
    assert first.shape == (stats.BOOTSTRAP_RESAMPLES, 2)
    np.testing.assert_array_equal(first, second)  # the same folder always gives the same report
    # Paired: both rows see the same resampled examples, so a constant shift stays exactly that shift.
    np.testing.assert_allclose(first[:, 1] - first[:, 0], 5.0)
    assert first[:, 0].mean() == pytest.approx(base.mean(), abs=0.5)


def test_compare_to_best_tells_a_real_difference_from_noise() -> None:
    rng = np.random.default_rng(2)
    best = rng.uniform(0, 100, size=300)
    clearly_worse = best - 3.0 - rng.normal(0, 1, size=300)
    noisy_twin = best + rng.normal(0, 10, size=300)
    columns = stats.bootstrap_means(np.stack([best, clearly_worse, noisy_twin]))

    worse = stats.compare_to_best(columns[:, 0], columns[:, 1], float(best.mean() - clearly_worse.mean()), True)
    assert not worse.same_as_best and worse.interval[0] > 0 and worse.p_value < 0.001
    assert worse.difference == pytest.approx(3.0, abs=0.2)
    twin = stats.compare_to_best(columns[:, 0], columns[:, 2], float(best.mean() - noisy_twin.mean()), True)
    assert twin.same_as_best and twin.interval[0] <= 0 <= twin.interval[1] and twin.p_value > 0.05
    itself = stats.compare_to_best(columns[:, 0], columns[:, 0], 0.0, True)
    assert itself.same_as_best and itself.interval == (0.0, 0.0) and itself.p_value == 1.0


def test_lower_is_better_flips_the_direction() -> None:
    rng = np.random.default_rng(3)
    best = rng.uniform(0, 10, size=200)  # a loss: lower is better
    worse = best + 2.0
    columns = stats.bootstrap_means(np.stack([best, worse]))
    comparison = stats.compare_to_best(columns[:, 0], columns[:, 1], 2.0, higher_is_better=False)
    assert not comparison.same_as_best and comparison.interval[0] == pytest.approx(2.0)


def test_gap_recovered_and_its_interval() -> None:
    assert stats.gap_recovered(60.0, 40.0, 80.0) == pytest.approx(0.5)
    assert stats.gap_recovered(40.0, 40.0, 80.0) == 0.0
    assert stats.gap_recovered(60.0, 40.0, 40.0) is None  # the teacher is no better than SFT: no gap to recover
    rng = np.random.default_rng(4)
    sft = rng.uniform(20, 60, size=400)
    teacher, method = sft + 40.0, sft + 20.0 + rng.normal(0, 5, size=400)
    columns = stats.bootstrap_means(np.stack([method, sft, teacher]))
    low, high = stats.gap_interval(columns[:, 0], columns[:, 1], columns[:, 2])  # type: ignore[misc]
    assert low < 0.5 < high and high - low < 0.1


def test_length_buckets_follow_dpkd() -> None:
    scores = np.array([100.0, 0.0, 100.0, 100.0, 0.0])
    words = [5, 30, 31, 70, 71]  # (0,30] holds 30, (30,70] holds 31 and 70, (70,∞) holds 71
    means, counts = stats.length_buckets(scores, words)
    assert counts == {"(0,30]": 2, "(30,70]": 2, "(70,inf)": 1}
    assert means == {"(0,30]": 50.0, "(30,70]": 100.0, "(70,inf)": 0.0}
    empty, _ = stats.length_buckets(np.array([100.0]), [3])
    assert empty["(70,inf)"] is None  # no example there: no score, not 0
