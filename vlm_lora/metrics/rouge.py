"""ROUGE-L exactly as pycocoevalcap's ``Rouge`` scorer.

For each sample: LCS length against every reference, precision = LCS / len(hyp)
and recall = LCS / len(ref); take the max precision and the max recall over
references and combine them as F with beta = 1.2.  The corpus score is the
mean of the per-sample scores.

Like pycocoevalcap, strings are split on single spaces (``str.split(" ")``),
so an empty hypothesis is the one token ``""``: it scores 0 against non-empty
references (and 1 against an empty reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vlm_lora.metrics.bleu import check_inputs

__all__ = ["lcs_length", "rouge_l", "rouge_l_sample"]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_sample(prediction: str, references: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L F-score of one tokenized hypothesis against its tokenized references."""
    tokens_c = prediction.split(" ")
    precisions, recalls = [], []
    for ref in references:
        tokens_r = ref.split(" ")
        lcs = lcs_length(tokens_r, tokens_c)
        precisions.append(lcs / float(len(tokens_c)))
        recalls.append(lcs / float(len(tokens_r)))
    prec_max, rec_max = max(precisions), max(recalls)
    if prec_max != 0 and rec_max != 0:
        return ((1 + beta ** 2) * prec_max * rec_max) / float(rec_max + beta ** 2 * prec_max)
    return 0.0


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> tuple[float, list[float]]:
    """(corpus ROUGE-L, per-sample scores), as ``Rouge().compute_score``."""
    check_inputs(predictions, references)
    scores = [rouge_l_sample(pred, refs, beta) for pred, refs in zip(predictions, references)]
    return math.fsum(scores) / len(scores), scores
