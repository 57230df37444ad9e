"""LoRA variants as small strategy objects.

A variant decides how an adapter's weights are initialised, how its update is added in the
forward pass and what weight delta a merge adds. The layer holds one variant per adapter
and never tests flags in ``forward``. Plain LoRA is the only variant so far; DoRA, LoRA-FA
and PiSSA/OLoRA initialisation plug in here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraVariant:
    """Plain LoRA (Hu et al., 2021): ``y = W x + s * B A x`` with ``s = alpha / r``.

    A is kaiming-uniform (as ``nn.Linear``, ``a = sqrt(5)``) and B is zero, so a fresh
    adapter leaves the model's outputs unchanged.
    """

    name = "lora"

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / rank

    def init_weights(self, lora_A: nn.Linear, lora_B: nn.Linear) -> None:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)

    def delta_weight(self, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float) -> torch.Tensor:
        """[out, in] weight update; computed in fp32 for an exact merge, cast by the caller."""
        return (lora_B.weight.float() @ lora_A.weight.float()) * scaling

    def forward_delta(self, x: torch.Tensor, lora_A: nn.Linear, lora_B: nn.Linear,
                      dropout: nn.Module, scaling: float) -> torch.Tensor:
        """[..., out] update for input x [..., in], in the adapter weights' dtype."""
        x = x.to(lora_A.weight.dtype)
        return lora_B(lora_A(dropout(x))) * scaling


VARIANTS: dict[str, type[LoraVariant]] = {"lora": LoraVariant}


def get_variant(name: str) -> LoraVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; valid: {sorted(VARIANTS)}")
    return VARIANTS[name]()
