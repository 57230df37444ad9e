"""A generated English corpus for the base model's text-only language-modelling objective.

A real VLM's language model knows English beyond its captions; without that, LoRA cannot
teach it a new domain's words. We cannot ship a downloaded corpus, so sentences are
generated from a small grammar over a few hundred common words, with digits and every
printable ASCII punctuation mark, so that every piece of the tokenizer gets trained.
"""

from __future__ import annotations

import random
import string

NOUNS = """time person year way day thing man world life hand part child eye woman place work week
case point number group problem fact house room door window table chair book paper letter
road street city town country river lake sea island mountain hill field garden tree flower
leaf grass stone rock sand water fire air light sound voice music song word name story
picture image photo color shape line circle square triangle dot spot mark edge corner side
center middle top bottom left right area region zone section layer surface pattern texture
cell body blood bone skin heart brain tissue sample slide glass lens view field report
doctor nurse patient study test result finding sign change growth size count stain dye
animal bird fish dog cat horse cow sheep mouse insect bee egg seed root branch fruit apple
car train ship plane bus bicycle wheel engine machine tool box bag cup plate bowl bottle
school student teacher class lesson question answer idea reason plan rule law market money
morning evening night week month season summer winter spring autumn weather rain snow wind
sun moon star sky cloud storm shadow mirror camera screen clock phone computer program""".split()
ADJECTIVES = """small large big little tiny huge long short tall wide narrow thin thick round flat
red green blue yellow purple pink brown black white gray orange dark bright pale light deep
old new young early late first last next other same different similar simple clear normal
strange common rare single double many few several round smooth rough soft hard warm cold
hot cool dry wet clean dirty empty full open closed quiet loud quick slow fast careful
upper lower inner outer central visible faint strong weak dense sparse regular irregular""".split()
VERBS = """sees finds shows holds keeps takes makes brings carries moves turns opens closes reads
writes draws paints counts marks checks studies notes records measures watches follows
describes covers fills crosses meets leaves enters reaches touches builds breaks cleans""".split()
INTRANSITIVE = """appears grows stays rests sits waits moves falls rises shines glows fades spreads
changes begins ends returns arrives""".split()
PREPOSITIONS = "in on at near under over above below beside behind inside outside across along around between".split()
ADVERBS = "slowly quickly quietly clearly often rarely always never sometimes nearly almost only also again".split()
NAMES = "Anna Ben Clara David Emma Frank Grace Henry Iris Jack Kate Leo Maria Noah Olga Paul Quinn Rosa Sam Tom Uma Vera Will Xena Yuri Zoe".split()
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve twenty hundred".split()


def _noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    count = rng.random()
    if count < 0.15:
        return f"{rng.randint(2, 99)} {noun}s"
    if count < 0.3:
        return f"{rng.choice(NUMBERS[2:])} {rng.choice(ADJECTIVES)} {noun}s"
    det = rng.choice(["the", "a", "this", "that", "every", "one", "some", "no"])
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    adjective = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
    return f"{det} {adjective}{noun}"


def sentence(rng: random.Random) -> str:
    """One English sentence; templates mix statements, questions, lists and numbers."""
    subject = rng.choice(NAMES) if rng.random() < 0.3 else _noun_phrase(rng)
    kind = rng.random()
    if kind < 0.35:
        body = f"{subject} {rng.choice(VERBS)} {_noun_phrase(rng)} {rng.choice(PREPOSITIONS)} {_noun_phrase(rng)}"
    elif kind < 0.55:
        body = f"{subject} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)} {rng.choice(PREPOSITIONS)} {_noun_phrase(rng)}"
    elif kind < 0.7:
        body = f"{subject} is {rng.choice(ADJECTIVES)}, {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}"
    elif kind < 0.8:
        body = f"there are {rng.randint(0, 500)} {rng.choice(NOUNS)}s in {_noun_phrase(rng)}; {rng.randint(1, 9)} of them are {rng.choice(ADJECTIVES)}"
    elif kind < 0.9:
        q = rng.choice(["where is", "why does", "how many", "what is", "who sees"])
        return f"{q.capitalize()} {_noun_phrase(rng)}? {rng.choice(['Yes', 'No', 'Maybe'])}."
    else:
        symbol = rng.choice(string.punctuation)
        body = f"note {rng.randint(1, 60)}: {subject} ({rng.choice(ADJECTIVES)}) {symbol} {rng.choice(NOUNS)}-{rng.choice(NOUNS)} \"{rng.choice(NOUNS)}\""
    text = body[0].upper() + body[1:]
    return text + rng.choice([".", ".", ".", "!", ";"])


def corpus(n_sentences: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n_sentences)]


if __name__ == "__main__":
    for line in corpus(10):
        print(line)
