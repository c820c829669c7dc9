"""Scoring protocol: ROUGE-L F (stemmed, max over references), exact match, corpus mean x100."""

from __future__ import annotations

import pytest

from kdbench.errors import KdbenchError
from kdbench.eval.scoring import corpus_score, exact_match, normalize_answer, rouge_l


def test_normalize_answer_lowercases_strips_punctuation_and_collapses_whitespace() -> None:
    assert normalize_answer("  The  Cat!\n\tsat, on-the MAT.  ") == "the cat sat onthe mat"


def test_normalize_answer_keeps_articles() -> None:
    assert normalize_answer("A cat and an owl, the end") == "a cat and an owl the end"


def test_rouge_l_hand_computed_lcs() -> None:
    # LCS = "the cat on the mat" (5 tokens) of 6 on each side: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)


def test_rouge_l_unequal_lengths_uses_f_measure() -> None:
    # LCS = "the cat" = 2; P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat", ["the cat sat down"]) == pytest.approx(2 / 3)


def test_rouge_l_applies_porter_stemmer() -> None:
    # Without stemming no token matches; with it both sides are "run dog".
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(1.0)


def test_rouge_l_takes_max_over_references() -> None:
    references = ["completely different words", "the cat sat on the mat"]
    score = rouge_l("the cat sat on the mat", references)
    assert score == pytest.approx(1.0)
    assert rouge_l("the cat", ["dog", "the cat sat down"]) == pytest.approx(2 / 3)


def test_rouge_l_empty_prediction_scores_zero() -> None:
    assert rouge_l("", ["the cat is on the mat"]) == 0.0


def test_rouge_l_no_overlap_scores_zero() -> None:
    assert rouge_l("alpha beta", ["gamma delta"]) == 0.0


def test_exact_match_normalises_case_punctuation_and_whitespace() -> None:
    assert exact_match("The  Cat!", ["the cat"]) == 1.0


def test_exact_match_keeps_articles() -> None:
    assert exact_match("a cat", ["cat"]) == 0.0


def test_exact_match_takes_max_over_references() -> None:
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("Rome", ["London", "Paris"]) == 0.0


def test_corpus_score_is_mean_times_100() -> None:
    predictions = ["The cat.", "dog", "bird"]
    references = [["the cat"], ["a dog"], ["Bird!", "parrot"]]
    # Per example: 1, 0, 1 -> mean 2/3 -> 66.67.
    assert corpus_score(exact_match, predictions, references) == pytest.approx(200 / 3)


def test_corpus_score_averages_rouge_l() -> None:
    predictions = ["the cat sat on the mat", "the cat"]
    references = [["the cat is on the mat"], ["the cat sat down"]]
    expected = 100 * (5 / 6 + 2 / 3) / 2
    assert corpus_score(rouge_l, predictions, references) == pytest.approx(expected)


def test_corpus_score_rejects_mismatched_lengths() -> None:
    with pytest.raises(KdbenchError, match="2 predictions but 1 reference"):
        corpus_score(exact_match, ["a", "b"], [["a"]])


def test_corpus_score_rejects_empty_reference_list() -> None:
    with pytest.raises(KdbenchError, match="Example 1 has an empty reference list"):
        corpus_score(exact_match, ["a", "b"], [["a"], []])


def test_corpus_score_rejects_empty_corpus() -> None:
    with pytest.raises(KdbenchError, match="0 predictions"):
        corpus_score(exact_match, [], [])


def test_rouge_l_equals_rouge_scores_own_scorer_on_the_tiny_suites_answers() -> None:
    """kdbench's scorer remembers tokenisations; its scores are rouge-score's ``RougeScorer(['rougeL'],
    use_stemmer=True)`` exactly, on every kind of tiny-suite reference and on wrong answers, scored twice."""
    from rouge_score import rouge_scorer

    from kdbench.tinysuite import TinySuiteOptions, generate

    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    records = generate(TinySuiteOptions(n_train=30, n_validation=1, n_test=60))["train"]
    answers = [str(r["response"]) for r in records] + ["running dogs", "", "The cats are sitting."]
    for _ in range(2):
        for record, answer in zip(records * 2, answers):
            expected = max(plain.score(ref, answer)["rougeL"].fmeasure for ref in record["references"])
            assert rouge_l(answer, record["references"]) == expected
