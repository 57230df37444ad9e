"""VQA accuracy and exact match with the VQAv2 answer normalization (pure Python).

``normalize_answer`` follows the official VQA evaluation (GT-Vision-Lab/VQA ``vqaEval.py``):
punctuation is removed or turned into spaces (removed everywhere when the text has a comma
between digits, or when the mark touches a space), periods not followed by a digit are dropped,
then the text is lower-cased, number words become digits, articles go and contractions get
their apostrophes back. Quirks of the original are kept on purpose, so numbers match it:
the apostrophe is not a punctuation mark here, the period rule's look-behind is a typo in the
original (``(?!<=\\d)``, so ``1.`` loses its period too) and at most 32 periods are dropped
(``re.UNICODE`` is passed as the count).

``vqa_accuracy`` is the VQAv2 soft score: with N >= 2 ground-truth answers (VQAv2 has 10), the
mean over the N leave-one-out subsets of ``min(1, matches / 3)``. The official script normalizes
only the prediction fully (VQA's stored answers are already normalized); user data is not, so
here both sides go through ``normalize_answer``, which leaves already normalized answers as
they are. With a single answer there is no leave-one-out subset; the score is then the
normalized exact match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["exact_match", "normalize_answer", "vqa_accuracy", "vqa_sample_accuracy"]

# the official tables (keys are answers without apostrophes, values with them)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the original's look-behind typo, kept for equal numbers
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_MAX_PERIODS = 32  # the original passes re.UNICODE (32) as sub's count


def _strip_punctuation(text: str) -> str:
    """Each mark is deleted if it touches a space (or the text has a digit comma), else becomes a space."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text  # tested on the input, as the original
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it (newlines/tabs to spaces, stripped, then the rules above)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def vqa_sample_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against its ground-truth answers (see the module doc)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one answer per sample")
    predicted = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    if len(truth) == 1:
        return float(predicted == truth[0])
    matches = sum(a == predicted for a in truth)
    # leaving out answer i removes one match exactly when answer i matches
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in truth) / len(truth)


def _check(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("nothing to score")


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(mean, per-sample) VQA accuracy in [0, 1] (the official script reports 100x, rounded)."""
    _check(predictions, answers)
    scores = [vqa_sample_accuracy(p, a) for p, a in zip(predictions, answers)]
    return sum(scores) / len(scores), scores


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(mean, per-sample): 1 when the normalized prediction equals any normalized answer, else 0."""
    _check(predictions, answers)
    scores = [float(normalize_answer(p) in {normalize_answer(a) for a in refs})
              for p, refs in zip(predictions, answers)]
    return sum(scores) / len(scores), scores
