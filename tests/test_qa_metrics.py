"""QA scorers against references: the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, its
normalization and accuracy loop transcribed here in its own style), the published ANLS example
of the Robust Reading Competition, and hand-read multiple-choice replies."""

import re
from functools import lru_cache

import pytest

from vlm_lora.metrics import anls, choice_accuracy, exact_match, extract_choice, normalize_answer, vqa_accuracy
from vlm_lora.metrics.anls import levenshtein
from vlm_lora.metrics.vqa import CONTRACTIONS


class OfficialVQAEval:
    """The official script's normalization and per-question accuracy (vqaEval.py, Python 3 version)."""

    manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    articles = ["a", "an", "the"]
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        return self.periodStrip.sub("", outText, re.UNICODE)

    def processDigitArticle(self, inText):
        outText = []
        for word in inText.lower().split():
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in CONTRACTIONS_OFFICIAL:
                outText[wordId] = CONTRACTIONS_OFFICIAL[word]
        return " ".join(outText)

    def accuracy(self, resAns, gtAnswers, normalize_gt=False):
        resAns = resAns.replace("\n", " ").replace("\t", " ").strip()
        resAns = self.processDigitArticle(self.processPunctuation(resAns))
        answers = [{"answer_id": i, "answer": a} for i, a in enumerate(gtAnswers)]
        if normalize_gt:  # what vlm-lora does for raw user answers
            for ansDic in answers:
                a = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
                ansDic["answer"] = self.processDigitArticle(self.processPunctuation(a))
        elif len(set(gtAnswers)) > 1:
            for ansDic in answers:
                ansDic["answer"] = self.processPunctuation(ansDic["answer"])
        gtAcc = []
        for gtAnsDatum in answers:
            otherGTAns = [item for item in answers if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            gtAcc.append(min(1, float(len(matchingAns)) / 3))
        return float(sum(gtAcc)) / len(gtAcc)


# a sample of the official table, typed from vqaEval.py (the product's table must contain these)
CONTRACTIONS_OFFICIAL = {"dont": "don't", "cant": "can't", "isnt": "isn't", "whats": "what's", "Im": "I'm",
                         "youre": "you're", "wont": "won't", "oclock": "o'clock", "somebody'd": "somebodyd",
                         "twas": "'twas", "yall'd've": "y'all'd've", "let's": "let's", "wouldn'tve": "wouldn't've"}

NORMALIZATION_CASES = [
    ("Two", "2"), ("the dog.", "dog"), ("A red, round ball!", "red round ball"), ("1,000", "1000"),
    ("3.5", "3.5"), ("yes.", "yes"), ("10.", "10"), ("left-hand", "left hand"), ("left - hand", "left  hand"),
    ("dont", "don't"), ("oclock", "o'clock"), ("Im fine", "im fine"), ("none", "0"), ("an apple", "apple"),
    ("(b)", "b"), ("red/blue", "red blue"), ("red / blue", "red  blue"), ("  spaced\tout\n", "spaced out"),
    ("e.g. this", "eg this"), ("2,3 and a,b", "23 and ab"), ("what's", "what's"), ("somebody'd", "somebodyd"),
    ("@home", "home"), ("x" + "." * 40, "x" + "." * 8), ("one two three ten eleven", "1 2 3 10 eleven"),
]


@pytest.mark.parametrize("text,expected", NORMALIZATION_CASES)
def test_normalization_equals_the_official_script(text, expected):
    official = OfficialVQAEval()
    reference = official.processDigitArticle(official.processPunctuation(text.replace("\n", " ").replace("\t", " ").strip()))
    assert normalize_answer(text) == reference
    assert " ".join(reference.split()) == " ".join(expected.split())  # the hand-read value (spaces aside)


def test_contraction_table_holds_the_official_entries():
    assert all(CONTRACTIONS[k] == v for k, v in CONTRACTIONS_OFFICIAL.items())
    assert len(CONTRACTIONS) == 120  # the official table has 120 entries


TEN = ["2", "2", "2", "two", "3", "2 dogs", "2", "3", "2.", "2"]
PREDICTIONS = [
    ("two", TEN), ("3", TEN), ("Three.", TEN), ("2 dogs", TEN), ("4", TEN),
    ("yes", ["yes"] * 10), ("Yes!", ["yes"] * 10), ("yes", ["yes"] * 2 + ["no"] * 8),
    ("no", ["yes"] * 3 + ["no"] * 7), ("red", ["red", "red", "dark red", "red.", "maroon"] * 2),
    ("the dog", ["dog", "dog", "a dog", "dogs", "puppy", "dog", "dog", "dog", "hound", "dog"]),
    ("1,000", ["1000"] * 4 + ["1,000"] * 6), ("don't know", ["dont know"] * 10),
]


def test_vqa_accuracy_equals_the_official_loop():
    official = OfficialVQAEval()
    mean, per_sample = vqa_accuracy([p for p, _ in PREDICTIONS], [a for _, a in PREDICTIONS])
    expected = [official.accuracy(p, a, normalize_gt=True) for p, a in PREDICTIONS]
    assert per_sample == pytest.approx(expected, abs=1e-6)
    assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    # with VQAv2's own (already normalized) answers both protocols agree with the official one
    normalized = [(p, a) for p, a in PREDICTIONS if all(normalize_answer(x) == x for x in a)]
    assert len(normalized) >= 4
    for p, a in normalized:
        assert vqa_accuracy([p], [a])[0] == pytest.approx(official.accuracy(p, a), abs=1e-6)
    # hand-read values: 'two' matches 7 of 10 "2"s after normalization -> 1.0; '3' matches 2 -> 0.6
    assert per_sample[0] == 1.0 and per_sample[1] == pytest.approx(0.6, abs=1e-6)
    assert per_sample[7] == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10, abs=1e-6)
    assert per_sample[8] == 1.0 and per_sample[4] == 0.0


def test_single_answer_is_exact_match_and_errors():
    assert vqa_accuracy(["Two."], [["2"]])[0] == 1.0
    assert vqa_accuracy(["3"], [["2"]])[0] == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        vqa_accuracy(["x"], [[]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], [["a"]])


def test_exact_match():
    mean, scores = exact_match(["The Dog.", "two", "cat", "2 dogs"], [["dog"], ["2", "3"], ["dog"], ["dog"]])
    assert scores == [1.0, 1.0, 0.0, 0.0] and mean == 0.5


@lru_cache(maxsize=None)
def _edit_distance(a: str, b: str) -> int:  # textbook recursion, independent of the product's DP
    if not a or not b:
        return len(a) + len(b)
    return min(_edit_distance(a[1:], b) + 1, _edit_distance(a, b[1:]) + 1, _edit_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_anls_published_example_and_reference():
    # the RRC / ST-VQA paper's example: answers "Coca Cola" and "Coca Cola Company"
    answers = ["Coca Cola", "Coca Cola Company"]
    replies = ["The Coca", "CocaCola", "Coca cola", "Cola", "Cat", "", "coca  COLA company "]
    mean, scores = anls(replies, [answers] * len(replies))
    assert scores == pytest.approx([0.0, 8 / 9, 1.0, 0.0, 0.0, 0.0, 1.0], abs=1e-6)
    for reply, score in zip(replies, scores):
        clean = " ".join(reply.lower().split())
        sims = [1 - _edit_distance(clean, a.lower()) / max(len(clean), len(a)) for a in answers]
        assert score == pytest.approx(max([s if 1 - s < 0.5 else 0.0 for s in sims]), abs=1e-6)
    assert mean == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    # at the threshold: distance exactly 0.5 scores 0 (NL < tau passes), just below passes
    assert anls(["ab"], [["cd" + "ab"]])[1] == [0.0] and anls(["abc"], [["abcde"]])[1] == [pytest.approx(0.6)]
    assert anls([""], [[""]])[1] == [1.0]
    for a, b in [("kitten", "sitting"), ("", "abc"), ("flaw", "lawn"), ("same", "same")]:
        assert levenshtein(a, b) == _edit_distance(a, b)


CHOICE_CASES = [("B", 1), ("(C)", 2), ("B. green", 1), ("The answer is D.", 3), ("blue", 2), ("It is blue.", 2),
                ("A red circle", 0), ("A", 0), ("Answer: (C)", 2), ("I think B", 1), ("a blue square", 2),
                ("red or green", None), ("The answer is a blue one", 2), ("Option B is right", 1),
                ("purple", None), ("E", None), ("yellow!", 3)]


@pytest.mark.parametrize("reply,expected", CHOICE_CASES)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, ["red", "green", "blue", "yellow"]) == expected


def test_choice_accuracy():
    options = [["red", "green", "blue", "yellow"]] * 4
    mean, scores = choice_accuracy(["B", "blue", "Answer: A", "no idea"], options, ["B", "blue", "(b)", "A"])
    assert scores == [1.0, 1.0, 0.0, 0.0] and mean == 0.5
    with pytest.raises(ValueError, match="neither an option letter"):
        choice_accuracy(["B"], options[:1], ["purple"])
