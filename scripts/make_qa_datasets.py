"""Generate the embedded question-answering sets over the ``general`` shape scenes.

Each scene's caption (written by ``make_datasets.py`` from the scene it drew) names its groups:
count, colour, shape, place. Questions are asked about those facts:

* ``qa_{train,eval}.jsonl``: ``{"image", "question", "answer", "kind"}`` - colour ("What color is the
  circle?"), count ("How many squares are there?", answered in digits) and shape ("What shape is
  the red object?");
* ``choice_{train,eval}.jsonl``: the colour question as multiple choice, ``options`` four colours.

Questions are picked with a seeded ``random.Random``, so re-running reproduces the files::

    python scripts/make_qa_datasets.py     # reads and writes assets/data/general
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3}
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
GROUP = re.compile(r"(a|one|two|three) (\w+) (circle|square|triangle)s? (?:at the [\w ]+?|scattered around)(?= and |\.$)")
QUESTIONS = {"train": 2, "eval": 1}  # per image


def scene_groups(caption: str) -> list[tuple[int, str, str]]:
    """(count, colour, shape) of each group a caption names."""
    groups = [(COUNTS[n], color, shape) for n, color, shape in GROUP.findall(caption)]
    if not groups:
        raise ValueError(f"caption not understood: {caption!r}")
    return groups


def questions(groups: list[tuple[int, str, str]]) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every question the scene answers unambiguously."""
    out = []
    shapes = [shape for _, _, shape in groups]
    for count, color, shape in groups:
        if shapes.count(shape) == 1:  # two groups of one shape: "the circle" has two colours
            noun = shape if count == 1 else shape + "s"
            verb = "is" if count == 1 else "are"
            out.append(("color", f"What color {verb} the {noun}?", color))
        plural = "object" if count == 1 else "objects"
        out.append(("shape", f"What shape {'is' if count == 1 else 'are'} the {color} {plural}?", shape))
    for shape in sorted(set(shapes)):
        total = sum(count for count, _, s in groups if s == shape)
        out.append(("count", f"How many {shape}s are there?", str(total)))
    return out


def write_sets(root: Path, split: str, rng: random.Random) -> tuple[int, int]:
    rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    qa, choice = [], []
    for row in rows:
        groups = scene_groups(row["caption"])
        asked = questions(groups)
        for kind, question, answer in rng.sample(asked, min(QUESTIONS[split], len(asked))):
            qa.append({"image": row["image"], "question": question, "answer": answer, "kind": kind})
        colored = [(q, a) for kind, q, a in asked if kind == "color"]
        if colored:
            question, answer = rng.choice(colored)
            present = {color for _, color, _ in groups}
            options = [answer, *rng.sample([c for c in COLORS if c not in present], 3)]
            rng.shuffle(options)
            choice.append({"image": row["image"], "question": question, "options": options,
                           "answer": "ABCD"[options.index(answer)]})
    for name, items in ((f"qa_{split}.jsonl", qa), (f"choice_{split}.jsonl", choice)):
        with open(root / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return len(qa), len(choice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path,
                        default=Path(__file__).resolve().parents[1] / "assets" / "data" / "general")
    args = parser.parse_args()
    rng = random.Random(25)
    for split in ("train", "eval"):
        n_qa, n_choice = write_sets(args.root, split, rng)
        print(f"{split}: {n_qa} questions, {n_choice} multiple-choice questions")


if __name__ == "__main__":
    main()
