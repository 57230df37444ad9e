"""Caption metrics: pure-Python scorers vs pycocoevalcap, and the PTB tokenizer."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from vlm_lora.metrics import (bleu, cider_d, meteor_spice_available, ptb_tokenize, ptb_tokenize_lines, rouge_l,
                              score_captions, score_predictions_file, score_pretokenized)
from vlm_lora.metrics import tokenizer as tok_module

TOL = 1e-6


# ----------------------------------------------------------------------------- fixtures (pre-tokenized)

def _random_set(seed: int = 1234, n_images: int = 50) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(40)] + ["a", "the", "dog", "cat", "on", "with"]
    preds, refs = [], []
    for _ in range(n_images):
        preds.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14))))
        refs.append([" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14)))
                     for _ in range(rng.randint(1, 5))])
    return preds, refs


LONG = " ".join(f"tok{i % 37}" for i in range(300))

FIXTURES: dict[str, tuple[list[str], list[list[str]]]] = {
    "single_ref": (["a dog runs on the grass", "a cat sleeps", "two birds fly over the lake"],
                   [["a dog is running on grass"], ["the cat is sleeping"], ["birds flying over a lake"]]),
    "multi_ref": (["a man riding a wave on a surfboard", "a plate of food with broccoli", "a red bus"],
                  [["a man riding a wave on top of a surfboard", "a surfer rides a large wave",
                    "a person surfing in the ocean"],
                   ["a plate with broccoli and rice", "some food on a white plate"],
                   ["a red double decker bus on a street", "a bus parked by the road", "red bus", "a big bus"]]),
    "empty_prediction": (["", "a dog on a couch", "", "a cat"],
                         [["a dog on the couch", "dog lying on a sofa"], ["a dog on a couch"],
                          ["a bird"], ["a cat on a mat", "the cat"]]),
    "all_empty": (["", ""], [["a dog"], ["a cat sits", "cat"]]),
    "long_prediction": ([LONG, "a small dog", LONG[:400]],
                        [["tok1 tok2 tok3 tok4", LONG[:200]], ["a small dog runs"], ["tok5 tok6 tok7"]]),
    "repeated_ngrams": (["a a a a a a", "the dog the dog the dog the dog", "on on on"],
                        [["a dog a cat", "a a"], ["the dog is the best dog"], ["on the table"]]),
    "identical": (["a dog runs on the grass", "a cat sleeps on a bed"],
                  [["a dog runs on the grass", "a dog is running"], ["a cat sleeps on a bed"]]),
    "no_shared_words": (["zebra xylophone quantum", "a dog"],
                        [["a cat on a mat", "the cat sits"], ["a dog in a park"]]),
    "single_image": (["a dog runs"], [["a dog runs fast", "the dog is running"]]),
    "random_50": _random_set(),
}


@pytest.fixture(scope="module")
def coco():
    """pycocoevalcap's scorers (they need no Java when given pre-tokenized dicts)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return {"bleu": Bleu(4), "rouge": Rouge(), "cider": Cider()}


def _dicts(preds: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    return {i: list(r) for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}


# ----------------------------------------------------------------------------- oracle tests

@pytest.mark.parametrize("name", list(FIXTURES))
def test_bleu_matches_pycocoevalcap(coco, name):
    preds, refs = FIXTURES[name]
    gts, res = _dicts(preds, refs)
    ref_corpus, ref_samples = coco["bleu"].compute_score(gts, res, verbose=0)
    corpus, samples = bleu(preds, refs)
    assert corpus == pytest.approx(ref_corpus, abs=TOL)
    for k in range(4):
        assert samples[k] == pytest.approx(ref_samples[k], abs=TOL)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_rouge_matches_pycocoevalcap(coco, name):
    preds, refs = FIXTURES[name]
    ref_corpus, ref_samples = coco["rouge"].compute_score(*_dicts(preds, refs))
    corpus, samples = rouge_l(preds, refs)
    assert corpus == pytest.approx(float(ref_corpus), abs=TOL)
    assert samples == pytest.approx([float(s) for s in ref_samples], abs=TOL)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_cider_matches_pycocoevalcap(coco, name):
    preds, refs = FIXTURES[name]
    ref_corpus, ref_samples = coco["cider"].compute_score(*_dicts(preds, refs))
    corpus, samples = cider_d(preds, refs)
    assert corpus == pytest.approx(float(ref_corpus), abs=TOL)
    assert samples == pytest.approx([float(s) for s in ref_samples], abs=TOL)


def test_fixtures_are_not_degenerate():
    """The oracle comparisons above must exercise non-trivial values."""
    preds, refs = FIXTURES["random_50"]
    assert 0.05 < bleu(preds, refs)[0][0] < 0.95
    assert cider_d(preds, refs)[0] > 0.05
    assert bleu(*FIXTURES["identical"])[0][3] == pytest.approx(1.0, abs=TOL)
    assert rouge_l(*FIXTURES["identical"])[0] == pytest.approx(1.0, abs=TOL)
    assert bleu(*FIXTURES["no_shared_words"])[1][0][0] == pytest.approx(0.0, abs=TOL)
    assert cider_d(*FIXTURES["single_image"])[0] == 0.0  # idf is 0 with one image


def test_score_pretokenized_uses_each_scorer(coco):
    preds, refs = FIXTURES["multi_ref"]
    gts, res = _dicts(preds, refs)
    result = score_pretokenized(preds, refs, per_sample=True)
    b, _ = coco["bleu"].compute_score(gts, res, verbose=0)
    assert [result[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(b, abs=TOL)
    assert result["rougeL"] == pytest.approx(float(coco["rouge"].compute_score(gts, res)[0]), abs=TOL)
    cider_corpus, cider_samples = coco["cider"].compute_score(gts, res)
    assert result["cider"] == pytest.approx(float(cider_corpus), abs=TOL)
    assert result["n"] == 3
    assert [row["cider"] for row in result["per_sample"]] == pytest.approx(list(cider_samples), abs=TOL)


# ----------------------------------------------------------------------------- API behaviour

def test_score_captions_keys_and_tokenization():
    result = score_captions(["A dog runs on the grass."], [["a dog runs on the grass", "A DOG RUNS!"]])
    assert set(result) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider", "n"}
    assert result["n"] == 1
    assert all(isinstance(result[k], float) for k in result if k != "n")
    assert result["bleu4"] == pytest.approx(1.0, abs=TOL)  # tokenization makes it identical to ref 1
    assert result["rougeL"] == pytest.approx(1.0, abs=TOL)


def test_score_captions_empty_prediction_does_not_crash():
    result = score_captions(["", "a cat."], [["a dog"], ["a cat", "the cat sits"]])
    assert result["n"] == 2
    assert 0.0 <= result["bleu1"] <= 1.0 and 0.0 <= result["rougeL"] <= 1.0


def test_cider_all_references_empty_is_zero():
    corpus, samples = cider_d(["a dog", ""], [[""], [""]])
    assert corpus == 0.0 and samples == [0.0, 0.0]


@pytest.mark.parametrize("preds, refs", [([], []), (["a"], []), (["a"], [[]]), (["a"], ["a dog"]),
                                         ([None], [["a"]])])
def test_invalid_inputs_raise(preds, refs):
    for fn in (bleu, rouge_l, cider_d, score_captions):
        with pytest.raises(ValueError):
            fn(preds, refs)


def test_score_predictions_file(tmp_path):
    rows = [{"image": "a.png", "prediction": "A dog runs.", "references": ["a dog runs", "a dog is running"]},
            {"image": "b.png", "prediction": "", "references": ["a cat"]},
            {"image": "c.png", "prediction": "Two cats.", "references": ["two cats on a bed"]}]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = score_predictions_file(path)
    assert result == score_captions([r["prediction"] for r in rows], [r["references"] for r in rows])
    assert result["n"] == 3

    path.write_text(json.dumps({"image": "a.png", "prediction": "x", "references": "a dog"}) + "\n")
    with pytest.raises(ValueError, match="references"):
        score_predictions_file(path)


def test_meteor_spice_available_needs_java(monkeypatch):
    assert isinstance(meteor_spice_available(), bool)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert meteor_spice_available() is False


# ----------------------------------------------------------------------------- tokenizer

TOKENIZER_CASES = [
    ("A man's dog doesn't like it.", "a man 's dog does n't like it"),
    ("It's 3.5 feet-long!", "it 's 3.5 feet-long"),
    ("Dogs' bones; cats: 10,000 -- wow", "dogs bones cats 10,000 wow"),
    ('"Hello," she said (quietly) [or] {not}.', "hello she said -lrb- quietly -rrb- -lsb- or -rsb- -lcb- not -rcb-"),
    ("I cannot go, gonna wanna", "i can not go gon na wan na"),
    ("can't won't I'm we're they've he'd you'll go", "ca n't wo n't i 'm we 're they 've he 'd you 'll go"),
    ("A   DOG\tRUNS  ", "a dog runs"),
    ("Mr. Smith went to Washington.", "mr. smith went to washington"),
    ("e.g. the U.S. flag etc.", "e.g. the u.s. flag etc."),
    ("a well-known x-ray of a t-shirt", "a well-known x-ray of a t-shirt"),
    ("$5.00 50% #1", "$ 5.00 50 % # 1"),
    ("wow!! really?! ok...", "wow !! really ?! ok"),
    ("\u2018curly\u2019 \u201cquotes\u201d it\u2019s", "curly quotes it 's"),
    ("12:30 3/4 1 1/2", "12:30 3/4 1\u00a01/2"),
    ("the letter b.", "the letter b."),
    ("o'clock rock'n'roll", "o'clock rock 'n' roll"),
    ("A dog -- or a cat - runs", "a dog or a cat runs"),
    ("--- ----- ***", "----- ***"),
    ("a \u2014 b \u2013 c", "a b c"),
    ("na\u00efve caf\u00e9", "na\u00efve caf\u00e9"),
    ("a \U0001f600 b", "a b"),
    ("1990s '90s y'all", "1990s '90s y' all"),
    ("Two dogs, a cat, and a bird.", "two dogs a cat and a bird"),
    ("a\nb", "a b"),
    ("", ""),
    ("you'll", "you ll"),  # Java quirk at the end of the file: "'" lexed as a quote, not "'ll"
]


@pytest.mark.parametrize("text, expected", TOKENIZER_CASES)
def test_ptb_tokenize_cases(text, expected):
    assert ptb_tokenize(text) == expected


def test_ptb_tokenize_lines_looks_into_next_line():
    # An acronym at a line end followed by "The ..." loses its period, as in Java.
    assert ptb_tokenize_lines(["a letter B.", "The end"]) == ["a letter b", "the end"]
    assert ptb_tokenize_lines(["a letter B.", "the end"]) == ["a letter b.", "the end"]
    assert ptb_tokenize("a letter B.") == "a letter b."
    assert ptb_tokenize_lines(["you'll", "x"]) == ["you 'll", "x"]


def test_fast_path_equals_full_lexer():
    rng = random.Random(0)
    vocab = "a b i x st mr dr etc co no jan fig dog cat cannot gonna wanna sat ave rd vs pp png c com www".split()
    checked = 0
    for _ in range(3000):
        line = "".join(rng.choice(["", " ", "  ", ", ", ","]) + rng.choice(vocab) for _ in range(rng.randint(0, 6)))
        line += "." if rng.random() < 0.6 else ""
        fast = tok_module._simple_tokens(line)
        if fast is None:
            continue
        checked += 1
        full = [t.lower() for t in tok_module._lex(line) if t.lower() not in tok_module.PUNCTUATIONS]
        assert fast == full, line
    assert checked > 500


JAVA_CORPUS = [text for text, _ in TOKENIZER_CASES if "\n" not in text and text] + [
    "A. B. The c", "Co.O'NEIL vs. Inc.A", "3a.b.c photo.jpg", "http://a.b/c:) me@x.y, #tag1 @bob",
    "\u201eq\u201c \u00ab\u00ab x \u00bb\u00bb \u2039y\u203a", "'hello' \"world\" ''nested'' ``tex''",
    "5'10 6'2\" l'amour O'Neil Shi'ite 'em 'cause goin' ol'", "Jan. mon. st. no. 5 fig. 3 sat. Del. del.",
    "ROCK'N'ROLL they'd HE'LL Y'ALL CAN'T", "\u00a35 \u20ac5 \u00a55 \u00a2 \u00bd", "a :) b :-( c ;D >_<",
    "<b>bold</b> a < b > c &amp; &QUOT;q&quot;", "x.5 ,5 .5. -5-year 3.5-inch 1.5:30 :30",
    "call (555) 555-5555 or 555-123-4567", "10 m\u00b2 and H\u2082O caf&eacute; #b&eacute;",
    "The cat sat on the mat.", "A.", "you'll",
]


def test_tokenizer_matches_java_ptbtokenizer():
    """Oracle check against pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, needs Java)."""
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(JAVA_CORPUS)})
    assert ptb_tokenize_lines(JAVA_CORPUS) == [java[i][0] for i in range(len(JAVA_CORPUS))]


def test_score_captions_matches_coco_pipeline(coco):
    """End to end: Java PTB tokenization + pycocoevalcap scorers == score_captions."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = ["A man riding a wave on a surfboard.", "", "Two dogs, playing with a frisbee!", "A plate of food."]
    refs = [["A man riding a wave on top of a surfboard.", "A surfer rides a large wave."],
            ["A cat sleeping on a couch."],
            ["Two dogs play with a red frisbee in the park.", "Dogs playing outside.", "two dogs"],
            ["A plate of food with broccoli.", "Some food on a white plate."]]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    b, _ = coco["bleu"].compute_score(gts, res, verbose=0)
    expected = {f"bleu{k + 1}": b[k] for k in range(4)}
    expected["rougeL"] = float(coco["rouge"].compute_score(gts, res)[0])
    expected["cider"] = float(coco["cider"].compute_score(gts, res)[0])
    result = score_captions(preds, refs)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=TOL), key
