"""LoRA variants as small strategy objects.

A variant decides what extra state an adapter has, how its update enters the forward pass,
and how a merge folds it into the base weight. ``LoraLinear`` holds one variant per adapter
and never tests flags in ``forward``.

* ``lora``    (Hu et al. 2021): ``y = W x + s B A x``.
* ``lora_fa`` (Zhang et al. 2023): the same, with A frozen after initialisation.
* ``dora``    (Liu et al. 2024): ``W' = m * (W + s B A) / ||W + s B A||_row``; the norm is
  detached in backward as the paper recommends (section 4.3).

Scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vlm_lora.lora.linear import LoraLinear


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight [out, in] in fp32, dequantized if it is a 4-bit layer."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    return weight.float()


class LoraVariant:
    """Plain LoRA."""

    name = "lora"
    trains_A = True

    # -- kept for layers that only need scaling and default init (fused qkv, MHA) --
    def scaling(self, rank: int, alpha: float) -> float:
        return lora_scaling(rank, alpha)

    def init_weights(self, lora_A: nn.Linear, lora_B: nn.Linear) -> None:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)

    def create(self, layer: "LoraLinear", name: str) -> None:
        """Extra per-adapter state, made after A and B are initialised."""

    def forward_delta(self, layer: "LoraLinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """[..., out] to add to ``base_out`` for input x [..., in]."""
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        x = x.to(lora_A.weight.dtype)
        return lora_B(lora_A(layer.lora_dropout[name](x))) * layer.scaling[name]

    def delta_weight(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        """[out, in] fp32 update ``s B A``."""
        return (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]

    def merge(self, layer: "LoraLinear", name: str, sign: float) -> None:
        weight = layer.base_layer.weight
        weight.copy_((weight.float() + sign * self.delta_weight(layer, name)).to(weight.dtype))


class LoraFAVariant(LoraVariant):
    """LoRA-FA: A is a fixed random projection; only B trains (saves A's optimizer state)."""

    name = "lora_fa"
    trains_A = False


class DoraVariant(LoraVariant):
    """DoRA: a trainable magnitude m [out] times the row-normalised direction ``W + s B A``."""

    name = "dora"

    def create(self, layer: "LoraLinear", name: str) -> None:
        with torch.no_grad():
            norm = self._weight_norm(layer, name)
        magnitude = nn.Parameter(norm.to(layer.lora_A[name].weight.dtype))
        module = nn.Module()
        module.weight = magnitude  # PEFT's layout: lora_magnitude_vector.<name>.weight
        layer.lora_magnitude_vector[name] = module

    def _weight_norm(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        """[out] row norms of W + s B A, fp32; B A enters detached (paper section 4.3)."""
        lora = (layer.lora_B[name].weight.detach().float() @ layer.lora_A[name].weight.detach().float())
        return (base_weight(layer.base_layer) + layer.scaling[name] * lora).norm(p=2, dim=1)

    def forward_delta(self, layer: "LoraLinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        magnitude = layer.lora_magnitude_vector[name].weight
        norm_scale = (magnitude.float() / self._weight_norm(layer, name).detach()).to(base_out.dtype)
        bias = layer.base_layer.bias
        plain = base_out - bias if bias is not None else base_out  # W x
        lora = lora_B(lora_A(layer.lora_dropout[name](x.to(lora_A.weight.dtype)))).to(base_out.dtype)
        return (norm_scale - 1) * plain + norm_scale * lora * layer.scaling[name]

    def merged_weight(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        """[out, in] fp32: m * (W + s B A) / ||W + s B A||_row."""
        combined = base_weight(layer.base_layer) + self.delta_weight(layer, name)
        magnitude = layer.lora_magnitude_vector[name].weight.float()
        return combined * (magnitude / combined.norm(p=2, dim=1)).unsqueeze(1)

    def merge(self, layer: "LoraLinear", name: str, sign: float) -> None:
        weight = layer.base_layer.weight
        if sign > 0:
            layer.dora_merge_scale[name] = self._weight_norm(layer, name)
            weight.copy_(self.merged_weight(layer, name).to(weight.dtype))
        else:  # W = W' * ||W + sBA|| / m - s B A, with the norm recorded at merge time
            scale = layer.dora_merge_scale.pop(name) / layer.lora_magnitude_vector[name].weight.float()
            weight.copy_((weight.float() * scale.unsqueeze(1) - self.delta_weight(layer, name)).to(weight.dtype))


VARIANTS: dict[str, type[LoraVariant]] = {"lora": LoraVariant, "lora_fa": LoraFAVariant, "dora": DoraVariant}


def get_variant(name: str) -> LoraVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]()
