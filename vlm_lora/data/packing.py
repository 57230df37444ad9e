"""Packing: a padded micro-batch becomes fewer rows, each holding whole samples back to back.

``pack_batch`` keeps only the real tokens of each sample (image tokens included, so an image's
tokens are never split), places the samples into rows (first fit) and gives every sample
``position_ids`` that restart at 0. The batch carries no ``attention_mask``: transformers then
reads the sample boundaries from the restarting ``position_ids`` and keeps attention within each
sample (FlashAttention varlen kernels with ``flash_attention_2``, which needs one row: pass a large
``row_tokens``; a block-diagonal causal mask with ``sdpa``/``eager``/``flex_attention``, where rows
no longer than the longest sample keep the mask as small as the padded batch's). Images
(``pixel_values``) are reordered with their samples: LLaVA-style models scatter image features into
the image-token slots in row-major order. Qwen-VL's multi-axis rope positions are computed per sample
by a function of the model's family (``rope_positions``) and packed with the tokens.

Samples per step do not change, so the loss (mean over answer tokens) and gradients equal the
padded batch's: no learning-rate or accumulation change is needed.
"""

from __future__ import annotations

import torch

from vlm_lora.data.wrapper import CollatorWrapper
from vlm_lora.data.datasets import IGNORE_INDEX, DataError

# processor outputs of videos (Qwen2-VL family): their temporal rope positions scale with time, not packed
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


def pack_batch(batch: dict[str, torch.Tensor], row_tokens: int | None = None, pad_id: int = 0,
               rope_positions=None) -> dict[str, torch.Tensor]:
    """Padded ``[B, T]`` batch -> ``[R, N]`` rows of whole samples back to back, R <= B.

    Rows hold up to ``max(row_tokens, longest sample)`` tokens (default: the longest sample, so the
    attention of a row never spans more than the padded batch's); samples are placed first-fit by
    decreasing length. Per-token tensors (shape ``[B, T]`` like ``input_ids``) keep the positions where
    ``attention_mask`` is 1; ``labels`` of each sample's first token are ``IGNORE_INDEX`` (no sample
    predicts the next one's start); ``position_ids`` [R, N] restart per sample; the short rows' tail
    (``pad_id``, labels ignored) is one more position run of its own, so it attends only to itself.
    Per-sample tensors (first dim B: ``pixel_values`` [B, 3, H, W], ...) follow the samples' new order,
    which is the order image-token slots take in the rows; others pass through. ``use_cache`` is False.

    Multi-axis rope (Qwen-VL, ``image_grid_thw`` [n_images, 3] and flattened patches ``pixel_values``
    [sum of t*h*w, C]) needs ``rope_positions``: padded batch -> (positions [3, B, T], images per sample
    [B]), from the model's family. Its positions are packed like any per-token tensor, under the restarting
    text positions: ``position_ids`` [4, R, N]; each sample's images (grid rows and patch blocks) move with it.
    """
    videos = [key for key in VIDEO_KEYS if key in batch]
    if videos:
        raise DataError(f"data.packing: videos ({', '.join(videos)}) are not packed (their rope positions scale "
                        "with time); set data.packing: false")
    if "image_grid_thw" in batch and rope_positions is None:
        raise DataError("data.packing: this batch has multi-axis rope positions (image_grid_thw) but no function "
                        "for them was given (rope_positions); set data.packing: false")
    if "attention_mask" not in batch:
        raise DataError("data.packing: the batch has no attention_mask to find each sample's tokens; "
                        "set data.packing: false")
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1).tolist()
    pixels = batch.get("pixel_values")
    if rope_positions is None and torch.is_tensor(pixels) and pixels.shape[0] != len(lengths):
        # several images (or tiles) per sample: their rows cannot follow the samples' new order one to one
        raise DataError(f"data.packing: the batch has {pixels.shape[0]} image rows for {len(lengths)} samples "
                        "(multi-image samples or image tiles), which packing does not reorder yet; "
                        "set data.packing: false")
    rows = _first_fit(lengths, max(row_tokens or 0, max(lengths)))
    order = [i for row in rows for i in row]
    width = max(sum(lengths[i] for i in row) for row in rows)

    def pack_tokens(value: torch.Tensor, fill: int, first=None) -> torch.Tensor:
        """[B, T, ...] -> [R, N, ...]: each row's samples' real tokens back to back, then ``fill``;
        ``first``: the value of each sample's first token instead of its own."""
        samples = [value[i][keep[i]] for i in range(len(lengths))]
        if first is not None:
            samples = [torch.cat([s[:1].new_full(s[:1].shape, first), s[1:]]) for s in samples]
        return torch.stack([_fill_row(torch.cat([samples[i] for i in row]), width, fill) for row in rows])

    packed = {}
    if rope_positions is not None:
        axes, images_per_sample = rope_positions(batch)  # [3, B, T], [B]
        if "image_grid_thw" in batch:
            packed.update(_reorder_patches(batch, order, images_per_sample))
    for key, value in batch.items():
        if key == "attention_mask" or key in packed:
            continue
        if not torch.is_tensor(value):
            packed[key] = value
        elif value.shape[:2] == keep.shape:  # per token
            fill = IGNORE_INDEX if key == "labels" else pad_id if key == "input_ids" else 0
            packed[key] = pack_tokens(value, fill, IGNORE_INDEX if key == "labels" else None)
        elif value.shape[0] == len(lengths):  # per sample
            packed[key] = value[order]
        else:
            packed[key] = value
    positions = torch.stack([
        sample_positions(torch.tensor([lengths[i] for i in row] + [width - sum(lengths[i] for i in row)]))
        for row in rows])
    if rope_positions is not None:  # row 0: text positions, read by the mask functions; rows 1-3: the rope axes
        positions = torch.stack([positions] + [pack_tokens(axis, 0) for axis in axes])
    packed["position_ids"] = positions
    packed["use_cache"] = False  # transformers reads sample boundaries from position_ids only without a cache
    return packed


def _reorder_patches(batch: dict[str, torch.Tensor], order: list[int], images_per_sample: torch.Tensor) -> dict:
    """``image_grid_thw`` [n_images, 3] and flattened ``pixel_values`` [sum of t*h*w, C] in the samples'
    new ``order``: each sample's images (consecutive, ``images_per_sample`` [B] of them) move with it."""
    grids = batch["image_grid_thw"]
    if int(images_per_sample.sum()) != grids.shape[0]:
        raise DataError(f"data.packing: the samples' image tokens account for {int(images_per_sample.sum())} "
                        f"images, image_grid_thw has {grids.shape[0]}; set data.packing: false")
    grid_blocks = grids.split(images_per_sample.tolist())
    patch_blocks = batch["pixel_values"].split([int(g.prod(-1).sum()) for g in grid_blocks])
    return {"image_grid_thw": torch.cat([grid_blocks[i] for i in order]),
            "pixel_values": torch.cat([patch_blocks[i] for i in order])}


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


class PackingCollator(CollatorWrapper):
    """Wraps a collator so that its batches come out packed (``pack_batch``).

    It also holds ``rope_positions`` (a module-level function or a ``functools.partial`` of one), which
    pickles into DataLoader workers too.
    """

    def __init__(self, collate, row_tokens: int | None = None, rope_positions=None):
        super().__init__(collate)
        self.row_tokens = row_tokens
        self.rope_positions = rope_positions  # multi-axis rope families: see ``pack_batch``
        tokenizer = getattr(collate, "tokenizer", None)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def __call__(self, items) -> dict[str, torch.Tensor]:
        return pack_batch(self.collate(items), self.row_tokens, self.pad_id, self.rope_positions)
