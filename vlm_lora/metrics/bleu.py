"""BLEU-1..4 exactly as pycocoevalcap's ``Bleu(4)`` (``BleuScorer``, option "closest").

Inputs are already tokenized strings (split on whitespace).  Per n-gram order
``k`` the clipped matches and the guesses are summed over the corpus; the
corpus score is ``prod_k((correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/k)``
times the brevity penalty ``exp(1 - reflen/testlen)`` computed on the corpus
totals, where each sample's reference length is the one closest to its
hypothesis length (ties: the shorter).  Per-sample scores use the same formula
on one sample.  An empty hypothesis scores 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "check_inputs", "ngram_counts"]

_SMALL = 1e-9
_TINY = 1e-15  # so that a zero guess count still gives 0


def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless there is >= 1 sample and every sample has >= 1 reference string."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no samples to score")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise ValueError(f"sample {i}: prediction must be a str, got {type(pred).__name__}")
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"sample {i}: references must be a non-empty list of str")


def ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of ``words``."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _bleu_from_counts(correct: Sequence[float], guess: Sequence[float], testlen: float,
                      reflen: float) -> list[float]:
    """BLEU-1..n from match/guess counts and lengths, in pycocoevalcap's float order."""
    scores = []
    product = 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)  # N.B. avoids division by zero
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]],
         n: int = 4) -> tuple[list[float], list[list[float]]]:
    """(corpus BLEU-1..n, per-order lists of per-sample scores), as ``Bleu(n).compute_score``.

    ``predictions[i]`` is the tokenized hypothesis of sample i and
    ``references[i]`` its tokenized references.  The corpus scores are what
    COCO reports; ``per_sample[k][i]`` is BLEU-(k+1) of sample i.
    """
    check_inputs(predictions, references)
    total_correct, total_guess = [0] * n, [0] * n
    total_testlen, total_reflen = 0, 0
    per_sample: list[list[float]] = [[] for _ in range(n)]
    for pred, refs in zip(predictions, references):
        max_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            words = ref.split()
            ref_lens.append(len(words))
            for ngram, count in ngram_counts(words, n).items():
                max_counts[ngram] = max(max_counts.get(ngram, 0), count)

        test_words = pred.split()
        testlen = len(test_words)
        reflen = min((abs(length - testlen), length) for length in ref_lens)[1]  # "closest"
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for ngram, count in ngram_counts(test_words, n).items():
            correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)

        for k, score in enumerate(_bleu_from_counts(correct, guess, testlen, reflen)):
            per_sample[k].append(score)
        total_testlen += testlen
        total_reflen += reflen
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]

    corpus = _bleu_from_counts(total_correct, total_guess, total_testlen, total_reflen)
    return corpus, per_sample
