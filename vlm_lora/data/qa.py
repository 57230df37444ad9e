"""Question-answering rows: ``{"image", "question", "answers": [...]}`` (or ``"answer": "..."``), and
multiple choice with ``"options": [...]``.

A QA row becomes a one-turn ``Sample``: the user turn is the question (for choice, the question
followed by the lettered options, ``choice_prompt``), the training target is the first answer,
and all answers are the references an eval scores against. Chat rows (``messages``) keep their
conversation; their last user turn is the question, and ``options`` may be given beside it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from vlm_lora.data.formats import IMAGE_KEYS, Problem, Sample

__all__ = ["CHOICE_INSTRUCTION", "choice_prompt", "qa_sample", "read_options"]

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def choice_prompt(question: str, options: list[str]) -> str:
    """``question``, one ``"A. option"`` line per option, then the instruction (LLaVA's MMBench style)."""
    lines = [f"{string.ascii_uppercase[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question.strip(), *lines, CHOICE_INSTRUCTION])


def read_options(record: dict) -> list[str] | None | str:
    """The row's ``options`` list, None without one, or why it is unusable (a string)."""
    options = record.get("options")
    if options is None:
        return None
    if not isinstance(options, list) or not 2 <= len(options) <= 26 \
            or not all(isinstance(o, str) and o.strip() for o in options):
        return "'options' must be a list of 2 to 26 non-empty strings"
    return options


def qa_sample(record: dict, row: int, where: str, root: Path, label_key: str) -> Sample | Problem:
    """A ``question`` row as a one-turn sample (see the module doc)."""
    image = next((record[k] for k in IMAGE_KEYS if record.get(k) not in (None, "", [])), None)
    images = image if isinstance(image, list) else [image]
    question = record.get("question")
    answers = record.get("answers", record.get("answer"))
    answers = [answers] if isinstance(answers, str) else answers
    if not images or not all(isinstance(i, str) for i in images):
        return Problem(row, where, "a question row needs 'image' (a path or a list of paths)")
    if not isinstance(question, str) or not question.strip():
        return Problem(row, where, "'question' must be a non-empty string")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        return Problem(row, where, "a question row needs 'answer' (a string) or 'answers' (non-empty strings)")
    options = read_options(record)
    if isinstance(options, str):
        return Problem(row, where, options)
    prompt = choice_prompt(question, options) if options else question.strip()
    return Sample(row, root / images[0], [(prompt, answers[0].strip())], list(answers), label=record.get(label_key),
                  row=row, where=where, extra_images=[root / i for i in images[1:]],
                  image_turns=[len(images)] if len(images) > 1 else None, question=question.strip(), options=options)


def attach_options(sample: Any, record: dict) -> Sample | Problem:
    """A chat row's ``options`` onto its sample (the question is its last user turn)."""
    options = read_options(record)
    if isinstance(options, str):
        return Problem(sample.id, sample.where, options)
    sample.options = options
    return sample
