"""Packing: a padded micro-batch becomes fewer rows, each holding whole samples back to back.

``pack_batch`` keeps only the real tokens of each sample (image tokens included, so an image's
tokens are never split), places the samples into rows (first fit) and gives every sample
``position_ids`` that restart at 0. The batch carries no ``attention_mask``: transformers then
reads the sample boundaries from the restarting ``position_ids`` and keeps attention within each
sample (FlashAttention varlen kernels with ``flash_attention_2``, which needs one row: pass a large
``row_tokens``; a block-diagonal causal mask with ``sdpa``/``eager``/``flex_attention``, where rows
no longer than the longest sample keep the mask as small as the padded batch's). Images
(``pixel_values``) are reordered with their samples: LLaVA-style models scatter image features into
the image-token slots in row-major order.

Samples per step do not change, so the loss (mean over answer tokens) and gradients equal the
padded batch's: no learning-rate or accumulation change is needed.
"""

from __future__ import annotations

import torch

from vlm_lora.data.datasets import IGNORE_INDEX, DataError

# processor outputs whose model computes multi-axis (temporal, height, width) rope positions from
# them (Qwen2-VL family): packing would need per-sample 3-D position ids, not done yet
MULTI_AXIS_ROPE_KEYS = ("image_grid_thw", "video_grid_thw")


def pack_batch(batch: dict[str, torch.Tensor], row_tokens: int | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Padded ``[B, T]`` batch -> ``[R, N]`` rows of whole samples back to back, R <= B.

    Rows hold up to ``max(row_tokens, longest sample)`` tokens (default: the longest sample, so the
    attention of a row never spans more than the padded batch's); samples are placed first-fit by
    decreasing length. Per-token tensors (shape ``[B, T]`` like ``input_ids``) keep the positions where
    ``attention_mask`` is 1; ``labels`` of each sample's first token are ``IGNORE_INDEX`` (no sample
    predicts the next one's start); ``position_ids`` [R, N] restart per sample; the short rows' tail
    (``pad_id``, labels ignored) is one more position run of its own, so it attends only to itself.
    Per-sample tensors (first dim B: ``pixel_values`` [B, 3, H, W], ...) follow the samples' new order,
    which is the order image-token slots take in the rows; others pass through. ``use_cache`` is False.
    """
    found = [key for key in MULTI_AXIS_ROPE_KEYS if key in batch]
    if found:
        raise DataError(f"data.packing: this model family uses multi-axis rope positions ({', '.join(found)}), "
                        "which packing does not build yet; set data.packing: false")
    if "attention_mask" not in batch:
        raise DataError("data.packing: the batch has no attention_mask to find each sample's tokens; "
                        "set data.packing: false")
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1).tolist()
    pixels = batch.get("pixel_values")
    if torch.is_tensor(pixels) and pixels.shape[0] != len(lengths):
        # several images (or tiles) per sample: their rows cannot follow the samples' new order one to one
        raise DataError(f"data.packing: the batch has {pixels.shape[0]} image rows for {len(lengths)} samples "
                        "(multi-image samples or image tiles), which packing does not reorder yet; "
                        "set data.packing: false")
    rows = _first_fit(lengths, max(row_tokens or 0, max(lengths)))
    order = [i for row in rows for i in row]
    width = max(sum(lengths[i] for i in row) for row in rows)
    packed = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if not torch.is_tensor(value):
            packed[key] = value
        elif value.shape[:2] == keep.shape:  # per token
            fill = IGNORE_INDEX if key == "labels" else pad_id if key == "input_ids" else 0
            samples = [value[i][keep[i]] for i in range(len(lengths))]
            if key == "labels":
                samples = [torch.cat([s[:1].new_full((1,), IGNORE_INDEX), s[1:]]) for s in samples]
            packed[key] = torch.stack([_fill_row(torch.cat([samples[i] for i in row]), width, fill) for row in rows])
        elif value.shape[0] == len(lengths):  # per sample
            packed[key] = value[order]
        else:
            packed[key] = value
    packed["position_ids"] = torch.stack([
        sample_positions(torch.tensor([lengths[i] for i in row] + [width - sum(lengths[i] for i in row)]))
        for row in rows])
    packed["use_cache"] = False  # transformers reads sample boundaries from position_ids only without a cache
    return packed


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the first row with room."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def _fill_row(row: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(row, (0, width - row.shape[0]), value=value)


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

    def __init__(self, collate, row_tokens: int | None = None):
        self.collate = collate
        self.row_tokens = row_tokens
        tokenizer = getattr(collate, "tokenizer", None)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def __call__(self, items) -> dict[str, torch.Tensor]:
        return pack_batch(self.collate(items), self.row_tokens, self.pad_id)

    def __getattr__(self, name: str):
        if name == "collate":  # not set yet (unpickling): avoid recursing into ourselves
            raise AttributeError(name)
        return getattr(self.collate, name)
