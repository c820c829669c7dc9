"""Per-example and corpus scores for generated answers.

Protocol (the numbers every leaderboard reports):

* ROUGE-L: the F-measure of the longest common subsequence, computed by the ``rouge_score``
  package with the Porter stemmer (``RougeScorer(['rougeL'], use_stemmer=True)``), taking the
  maximum over an example's references.
* Exact match: 1.0 when the normalised prediction equals the normalised form of any reference,
  else 0.0. Normalisation lowercases, strips ``string.punctuation`` and collapses whitespace;
  articles are kept, unlike SQuAD-style normalisation.
* Corpus score: the per-example score x100, averaged over examples.

This module is pure Python (no torch) so scoring can be tested and reused without a model.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

# One translate table built once: deleting punctuation is the hot path of exact match.
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_WHITESPACE_RUN = re.compile(r"\s+")

ExampleScorer = Callable[[str, Sequence[str]], float]


def normalize_answer(text: str) -> str:
    """Lowercase, delete ``string.punctuation``, collapse whitespace runs to one space, strip.

    Articles (a/an/the) are deliberately kept: "a cat" and "cat" are different answers here.
    """
    without_punctuation = text.lower().translate(_PUNCTUATION_TABLE)
    return _WHITESPACE_RUN.sub(" ", without_punctuation).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """Exact match: 1.0 if the normalised prediction equals any normalised reference, else 0.0.

    Max over references; see :func:`normalize_answer` for the normalisation.
    """
    normalized_prediction = normalize_answer(prediction)
    return float(any(normalized_prediction == normalize_answer(ref) for ref in references))


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> RougeScorer:
    # Imported and built lazily: the scorer loads NLTK's stemmer, which nothing else needs.
    from rouge_score import rouge_scorer, tokenizers

    class RememberingTokenizer(tokenizers.Tokenizer):
        """rouge-score's own tokenizer with the Porter stemmer (what ``use_stemmer=True`` builds), remembering what it
        has tokenised: an example's references are scored against every evaluation seed's answer, and many answers
        repeat, so most texts are tokenised and stemmed once instead of once per comparison. The same tokens."""

        def __init__(self) -> None:
            self._tokens = lru_cache(maxsize=1 << 16)(tokenizers.DefaultTokenizer(use_stemmer=True).tokenize)

        def tokenize(self, text: str) -> list[str]:
            return self._tokens(text)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=RememberingTokenizer())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1] (``rouge_score``, Porter stemmer), max over references.

    An empty reference list scores 0.0 here; :func:`corpus_score` rejects it before that.
    """
    scorer = _rouge_l_scorer()
    return max(
        (scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references),
        default=0.0,
    )


def example_scores(
    fn: ExampleScorer,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
) -> list[float]:
    """``fn`` per example (max over its references), in [0, 1], in the examples' order.

    Raises KdbenchError when the prediction and reference counts differ, an example has no
    reference, or there are no examples, because each would make an average over them meaningless.
    """
    if len(predictions) != len(references):
        raise KdbenchError(
            f"Got {len(predictions)} predictions but {len(references)} reference lists; "
            "expected one reference list per prediction."
        )
    for index, example_references in enumerate(references):
        if len(example_references) == 0:
            raise KdbenchError(
                f"Example {index} has an empty reference list; "
                "expected at least one reference per example."
            )
    if not predictions:
        # A mean over zero examples is undefined; a silent 0.0 would look like a real score.
        raise KdbenchError("Got 0 predictions; expected at least one example to score.")
    return [fn(prediction, refs) for prediction, refs in zip(predictions, references)]


def corpus_score(
    fn: ExampleScorer,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
) -> float:
    """Corpus score: :func:`example_scores` x100, averaged over examples (same checks)."""
    return mean_times_100(example_scores(fn, predictions, references))


def mean_times_100(scores: Sequence[float]) -> float:
    """The corpus score of per-example scores in [0, 1]."""
    return 100.0 * sum(scores) / len(scores)
