"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) without Java.

``score_captions`` reproduces pycocoevalcap's ``COCOEvalCap`` numbers for these
metrics: captions go through the PTB tokenizer (references in image order,
then the predictions, as two tokenizer runs), then through the scorers.
METEOR and SPICE need Java; ``meteor_spice_available`` only says whether they
could be run with pycocoevalcap.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from vlm_lora.metrics.bleu import bleu, check_inputs
from vlm_lora.metrics.cider import cider_d
from vlm_lora.metrics.rouge import rouge_l
from vlm_lora.metrics.tokenizer import ptb_tokenize_lines

__all__ = ["meteor_spice_available", "score_captions", "score_predictions_file", "score_pretokenized"]

METRIC_NAMES = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider")


def score_pretokenized(predictions: Sequence[str], references: Sequence[Sequence[str]],
                       per_sample: bool = False) -> dict:
    """Metrics of already tokenized captions (no tokenizer applied).

    Returns ``{"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider": float, "n": int}``;
    with ``per_sample=True`` also ``"per_sample"``: one dict of the six metrics per sample.
    """
    check_inputs(predictions, references)
    bleu_corpus, bleu_samples = bleu(predictions, references, n=4)
    rouge_corpus, rouge_samples = rouge_l(predictions, references)
    cider_corpus, cider_samples = cider_d(predictions, references)
    result: dict = {f"bleu{k + 1}": float(bleu_corpus[k]) for k in range(4)}
    result["rougeL"] = float(rouge_corpus)
    result["cider"] = float(cider_corpus)
    result["n"] = len(predictions)
    if per_sample:
        columns = [*bleu_samples, rouge_samples, cider_samples]
        result["per_sample"] = [{name: float(col[i]) for name, col in zip(METRIC_NAMES, columns)}
                                for i in range(len(predictions))]
    return result


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   per_sample: bool = False) -> dict:
    """PTB-tokenize raw captions, then ``score_pretokenized``.

    ``predictions[i]`` is the generated caption of sample i, ``references[i]``
    its list of ground-truth captions.  Empty predictions are allowed.
    """
    check_inputs(predictions, references)
    flat_refs = ptb_tokenize_lines([ref for refs in references for ref in refs])
    tokenized_refs, start = [], 0
    for refs in references:
        tokenized_refs.append(flat_refs[start:start + len(refs)])
        start += len(refs)
    return score_pretokenized(ptb_tokenize_lines(list(predictions)), tokenized_refs, per_sample)


def meteor_spice_available() -> bool:
    """True if ``java`` is on PATH and pycocoevalcap's METEOR and SPICE jars are installed.

    Only a check: nothing is run and pycocoevalcap is not imported.
    """
    if shutil.which("java") is None:
        return False
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0])
    return (root / "meteor" / "meteor-1.5.jar").is_file() and (root / "spice" / "spice-1.0.jar").is_file()


def score_predictions_file(path: str | Path, per_sample: bool = False) -> dict:
    """Score a JSONL file of rows ``{"image": ..., "prediction": str, "references": [str, ...]}``."""
    predictions, references = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            prediction, refs = row.get("prediction"), row.get("references")
            if not isinstance(prediction, str):
                raise ValueError(f"{path}:{line_no}: 'prediction' must be a string")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{path}:{line_no}: 'references' must be a non-empty list of strings")
            predictions.append(prediction)
            references.append(refs)
    if not predictions:
        raise ValueError(f"{path}: no rows to score")
    return score_captions(predictions, references, per_sample)
