"""Before training: which samples cannot fit ``train.max_length`` (image tokens + prompt + one answer token).

Reads a ``ChatCollator``'s own layout (its template, image-token shifts and fit rule), so the check and the
collated batches agree exactly.
"""

from __future__ import annotations

import logging

from PIL import Image

from vlm_lora.data.collate import _label_spans, _Skip
from vlm_lora.data.datasets import _skip_line
from vlm_lora.data.formats import DataError, Problem, format_problems
from vlm_lora.data.pixels import image_sizes
from vlm_lora.data.video import media_sizes

log = logging.getLogger("vlm_lora")


def check_lengths(collator, dataset) -> list[Problem]:
    """Before training: the samples that cannot fit ``max_length`` (image + prompt + one answer token).

    ``on_bad_sample="error"``: one ``DataError`` listing them all; ``"skip"``: they are removed from
    ``dataset`` (``dataset.drop``, so they land in ``dataset.skipped``), added to ``collator.skipped`` and
    logged in one line. Also logs how many samples will be cut. Returns the problems.
    """
    if collator.max_length is None:
        return []
    bad, problems, cut = [], [], 0
    for example in dataset.examples:
        sizes = image_sizes(example)
        sizes = collator.pixel_budget.fit_sizes(sizes) if collator.pixel_budget else sizes
        sizes = media_sizes(example, sizes, collator.processor) if getattr(example, "videos", None) else sizes
        if (len(sizes) > 1 and not collator.multi_image) or (not sizes and (collator.prefix_lm or collator.plain)):
            continue  # the collator refuses it (or skips and counts it) by name
        try:
            if collator.prefix_lm:
                encoded = collator._encode_suffix(Image.new("RGB", tuple(sizes[0])), example)
                total, spans = encoded["input_ids"].shape[1], _label_spans(encoded["labels"][0])
            else:
                texts, add_special, full, bounds = collator._layout(example)
                shifts = collator._turn_shifts(example, texts, add_special, sizes, None)
                spans = [(shift + bounds[2 * i], shift + bounds[2 * i + 1]) for i, shift in enumerate(shifts)]
                total = shifts[-1] + len(full)
            kept, _ = collator._fit(example, spans, total)
            cut += kept < total
        except _Skip as error:
            bad.append(example)
            problems.append(error.problem)
    if problems and collator.on_bad_sample == "error":
        raise DataError(format_problems(dataset.path, problems, f"sample(s) too long for max_length "
                                        f"{collator.max_length} (raise train.max_length or set on_bad_sample: skip)"))
    if problems:
        dataset.drop(bad, problems)
        collator.skipped += problems
        log.warning("%s", _skip_line(dataset.path, problems, "too long sample(s)"))
        if not dataset.examples:
            raise DataError(f"{dataset.path}: no sample fits max_length {collator.max_length}")
    if cut:
        log.info("%s: %d sample(s) longer than max_length %d are cut in their last answer",
                 dataset.path, cut, collator.max_length)
    return problems
