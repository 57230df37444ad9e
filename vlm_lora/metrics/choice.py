"""Multiple-choice accuracy from free-form replies: the chosen option is read from the reply's text.

``extract_choice`` finds which option a reply picks, in this order (first rule that decides wins):

1. a letter given as the answer: the reply is ``B``, ``(B)``, ``B.``, ``B)``, ``B:``, or starts so
   (``"B. blue"``), or says ``answer is B`` / ``answer: (B)`` / ``option B``;
2. the reply is an option's text (case, surrounding punctuation and articles ignored);
3. exactly one option's text occurs in the reply as whole words;
4. exactly one option letter stands alone in the reply (upper-case; ``A`` followed by a
   lower-case word is read as the article).

Otherwise the reply picks nothing and scores 0. ``answer_index`` reads the ground truth, a letter
or an option's text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["answer_index", "choice_accuracy", "extract_choice", "option_letter"]

_LEADING_LETTER = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s|$)")
_STATED_LETTER = re.compile(r"(?i:answer(?: is)?|option|choice)\s*[:\-]?\s*[\(\[]?([A-Z])\b(?!')")
_LONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def option_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"at most 26 options (A-Z), got index {index}")
    return string.ascii_uppercase[index]


def _words(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, single spaces."""
    cleaned = "".join(" " if c in string.punctuation else c for c in text.lower())
    return " ".join(w for w in cleaned.split() if w not in ("a", "an", "the"))


def extract_choice(reply: str, options: Sequence[str]) -> int | None:
    """Index of the option ``reply`` picks, or None (rules in the module doc)."""
    letters = string.ascii_uppercase[:len(options)]
    stated = _LEADING_LETTER.match(reply) or _STATED_LETTER.search(reply)
    if stated and stated.group(1).upper() in letters:
        letter = stated.group(1).upper()
        is_article = stated.re is _LEADING_LETTER and letter == "A" and re.match(r"^\s*A\s+[a-z]", reply)
        if not is_article:
            return letters.index(letter)
    words, texts = _words(reply), [_words(o) for o in options]
    if words in texts and texts.count(words) == 1:
        return texts.index(words)
    found = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", words)]
    if len(found) == 1:
        return found[0]
    lone = {m.group(1) for m in _LONE_LETTER.finditer(reply) if m.group(1) in letters
            and not (m.group(1) == "A" and re.match(r"\s+[a-z]", reply[m.end():]))}
    return letters.index(lone.pop()) if len(lone) == 1 else None


def answer_index(answer: str, options: Sequence[str]) -> int:
    """Index of the ground-truth ``answer``: an option letter (``"B"``, ``"(B)"``) or an option's text."""
    letter = answer.strip().strip("().").upper()
    if len(letter) == 1 and letter in string.ascii_uppercase[:len(options)]:
        return string.ascii_uppercase.index(letter)
    texts = [o.strip().lower() for o in options]
    if answer.strip().lower() in texts:
        return texts.index(answer.strip().lower())
    raise ValueError(f"answer {answer!r} is neither an option letter "
                     f"({', '.join(string.ascii_uppercase[:len(options)])}) nor one of the options {list(options)}")


def choice_accuracy(predictions: Sequence[str], options: Sequence[Sequence[str]],
                    answers: Sequence[str]) -> tuple[float, list[float]]:
    """(mean, per-sample) accuracy: 1 when the option read from the reply is the answer's."""
    if not len(predictions) == len(options) == len(answers):
        raise ValueError(f"{len(predictions)} predictions, {len(options)} option lists, {len(answers)} answers")
    if not predictions:
        raise ValueError("nothing to score")
    scores = [float(extract_choice(p, o) == answer_index(a, o)) for p, o, a in zip(predictions, options, answers)]
    return sum(scores) / len(scores), scores
