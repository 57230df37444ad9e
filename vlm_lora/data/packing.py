"""Padding-free packing: a padded micro-batch becomes one row holding its samples back to back.

``pack_batch`` keeps only the real tokens of each sample (image tokens included, so an image's
tokens are never split), concatenates the samples into a single row and gives every sample
``position_ids`` that restart at 0. The batch carries no ``attention_mask``: transformers then
reads the sample boundaries from the restarting ``position_ids`` and keeps attention within each
sample (FlashAttention varlen kernels with ``flash_attention_2``; a block-diagonal causal mask with
``sdpa``/``eager``/``flex_attention``). Images (``pixel_values``) stay in sample order, which is
the order in which LLaVA-style models scatter image features into the image-token slots.

Samples per step do not change, so the loss (mean over answer tokens) and gradients equal the
padded batch's: no learning-rate or accumulation change is needed.
"""

from __future__ import annotations

import torch

from vlm_lora.data.datasets import IGNORE_INDEX, DataError

# processor outputs whose model computes multi-axis (temporal, height, width) rope positions from
# them (Qwen2-VL family): packing would need per-sample 3-D position ids, not done yet
MULTI_AXIS_ROPE_KEYS = ("image_grid_thw", "video_grid_thw")


def pack_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padded ``[B, T]`` batch -> one ``[1, N]`` row, N = real tokens of all samples.

    Per-token tensors (shape ``[B, T]`` like ``input_ids``) keep the positions where
    ``attention_mask`` is 1; ``labels`` of each sample's first token are ``IGNORE_INDEX`` (so no
    sample predicts the next one's start); ``position_ids`` [1, N] restart per sample; other
    tensors (``pixel_values`` [B, 3, H, W], ...) pass through unchanged; ``use_cache`` is False.
    """
    found = [key for key in MULTI_AXIS_ROPE_KEYS if key in batch]
    if found:
        raise DataError(f"data.packing: this model family uses multi-axis rope positions ({', '.join(found)}), "
                        "which packing does not build yet; set data.packing: false")
    if "attention_mask" not in batch:
        raise DataError("data.packing: the batch has no attention_mask to find each sample's tokens; "
                        "set data.packing: false")
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1)
    packed = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        per_token = torch.is_tensor(value) and value.shape[:2] == keep.shape
        packed[key] = value[keep].unsqueeze(0) if per_token else value
    starts = torch.cumsum(lengths, 0) - lengths
    if "labels" in packed:
        packed["labels"][0, starts] = IGNORE_INDEX
    packed["position_ids"] = sample_positions(lengths).unsqueeze(0)
    packed["use_cache"] = False  # transformers reads sample boundaries from position_ids only without a cache
    return packed


def sample_positions(lengths: torch.Tensor) -> torch.Tensor:
    """[N] positions 0..L_i-1 for each sample length L_i, back to back: ``[3, 2] -> [0, 1, 2, 0, 1]``."""
    total = int(lengths.sum())
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.arange(total) - starts


class PackingCollator:
    """Wraps a collator so that its batches come out packed (``pack_batch``).

    Attributes other than the call (``check_lengths``, ``skipped``, ...) are the wrapped collator's.
    Module-level and holding only the collator, so it pickles into DataLoader workers.
    """

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items) -> dict[str, torch.Tensor]:
        return pack_batch(self.collate(items))

    def __getattr__(self, name: str):
        if name == "collate":  # not set yet (unpickling): avoid recursing into ourselves
            raise AttributeError(name)
        return getattr(self.collate, name)
