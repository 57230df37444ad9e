"""ANLS, the Average Normalized Levenshtein Similarity of DocVQA / ST-VQA (Biten et al., ICCV 2019).

Per question: ``max`` over its answers of ``1 - NL(prediction, answer)`` where that distance is below
the threshold ``tau`` (0.5), else 0; ``NL`` is the edit distance over the longer string's length.
Texts are compared lower-cased, stripped, with runs of whitespace made one space (as the Robust
Reading Competition's script); two empty strings are equal.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["anls", "anls_sample", "levenshtein"]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _clean(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_sample(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """ANLS of one prediction against its answers."""
    if not answers:
        raise ValueError("anls needs at least one answer per sample")
    predicted, best = _clean(prediction), 0.0
    for answer in answers:
        truth = _clean(answer)
        longest = max(len(truth), len(predicted))
        distance = levenshtein(predicted, truth) / longest if longest else 0.0
        if distance < tau:
            best = max(best, 1.0 - distance)
    return best


def anls(predictions: Sequence[str], answers: Sequence[Sequence[str]], tau: float = 0.5) -> tuple[float, list[float]]:
    """(mean, per-sample) ANLS over the questions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("nothing to score")
    scores = [anls_sample(p, a, tau) for p, a in zip(predictions, answers)]
    return sum(scores) / len(scores), scores
