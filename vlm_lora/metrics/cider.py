"""CIDEr-D exactly as pycocoevalcap's ``Cider`` scorer (n=4, sigma=6).

* n-gram document frequencies come from the references of the evaluated set
  (an n-gram counts once per image); idf = log(#images) - log(max(1, df));
* each sentence becomes one tf-idf vector per n-gram order;
* similarity per order: sum over hypothesis n-grams of
  ``min(hyp, ref) * ref`` (clipping) divided by the two norms, times the
  gaussian length penalty ``exp(-delta**2 / (2 * sigma**2))``;
* per sample: mean over orders, averaged over references, times 10;
  the corpus score is the mean over samples.

Faithful quirks: "length" is pycocoevalcap's, i.e. the number of *bigrams*
(``len(words) - 1``), and with a single image every idf is 0, so the score is
0.  An empty hypothesis scores 0.  pycocoevalcap raises if every reference of
the whole set is empty; here the score is then simply 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from vlm_lora.metrics.bleu import check_inputs, ngram_counts

__all__ = ["cider_d"]

NGram = tuple[str, ...]


def _tfidf(counts: Counter[NGram], doc_freq: Counter[NGram], log_num_images: float,
           n: int) -> tuple[list[dict[NGram, float]], list[float], int]:
    """(tf-idf vector per order, their norms, pycocoevalcap "length" = bigram count)."""
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for ngram, term_freq in counts.items():
        df = math.log(max(1.0, doc_freq.get(ngram, 0.0)))
        k = len(ngram) - 1
        vec[k][ngram] = float(term_freq) * (log_num_images - df)
        norm[k] += pow(vec[k][ngram], 2)
        if k == 1:
            length += term_freq
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(vec_hyp: list[dict[NGram, float]], vec_ref: list[dict[NGram, float]], norm_hyp: list[float],
                norm_ref: list[float], length_hyp: int, length_ref: int, sigma: float) -> list[float]:
    """Clipped cosine similarity per n-gram order with the gaussian length penalty."""
    delta = float(length_hyp - length_ref)
    val = [0.0] * len(vec_hyp)
    for k in range(len(vec_hyp)):
        for ngram, weight in vec_hyp[k].items():
            ref_weight = vec_ref[k].get(ngram, 0.0)
            val[k] += min(weight, ref_weight) * ref_weight
        if norm_hyp[k] != 0 and norm_ref[k] != 0:
            val[k] /= norm_hyp[k] * norm_ref[k]
        val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
    return val


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-sample scores), as ``Cider().compute_score``.

    Document frequencies are computed from ``references``, so the score of a
    sample depends on the whole evaluated set (as in COCO evaluation).
    """
    check_inputs(predictions, references)
    ref_counts = [[ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for counts_per_ref in ref_counts:
        doc_freq.update({ngram for counts in counts_per_ref for ngram in counts})
    log_num_images = math.log(float(len(ref_counts)))

    scores = []
    for pred, counts_per_ref in zip(predictions, ref_counts):
        vec, norm, length = _tfidf(ngram_counts(pred.split(), n), doc_freq, log_num_images, n)
        total = [0.0] * n
        for counts in counts_per_ref:
            vec_ref, norm_ref, length_ref = _tfidf(counts, doc_freq, log_num_images, n)
            sim = _similarity(vec, vec_ref, norm, norm_ref, length, length_ref, sigma)
            total = [a + b for a, b in zip(total, sim)]
        score = sum(total) / n  # mean over n-gram orders
        score /= len(counts_per_ref)
        score *= 10.0
        scores.append(score)
    return math.fsum(scores) / len(scores), scores
