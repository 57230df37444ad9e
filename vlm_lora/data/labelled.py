"""The answer positions of a training batch, found on the CPU when the batch is made.

The labelled-positions loss (``vlm_lora.train.loss``) gathers the hidden states whose next token is
labelled. Finding them on the device is a ``nonzero``: its result size lives on the GPU, so the host waits
for every queued kernel before it can go on, once per micro-batch. The labels exist on the CPU first, in the
collator: ``WithLabelledPositions`` adds the positions to the batch there, and they travel to the device
with it (pinned, non-blocking), so the training step never waits for the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_lora.data.wrapper import CollatorWrapper
from vlm_lora.data.datasets import IGNORE_INDEX

LABELLED_POSITIONS = "labelled_positions"  # batch key: [N] int64 flat positions whose next token is labelled


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S]: the label each position predicts (the next one), ``-100`` at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] labels -> [N] int64: the flat positions (``b * S + s``) whose next token is labelled."""
    return positions_of(next_token_targets(labels).flatten())


def positions_of(targets: torch.Tensor) -> torch.Tensor:
    """[B * S] flat next-token targets -> [N] int64 positions of those not ``IGNORE_INDEX``."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


class WithLabelledPositions(CollatorWrapper):
    """Wraps a collator so that each batch with ``labels`` also carries ``LABELLED_POSITIONS``."""

    def __call__(self, items) -> dict:
        batch = self.collate(items)
        if "labels" in batch:
            batch[LABELLED_POSITIONS] = labelled_positions(batch["labels"])
        return batch
