"""VeRA (Kopiczko et al. 2024): one frozen random pair (A, B) shared by every layer of an
adapter, and per-layer trained scaling vectors ``d`` [r] and ``b`` [out]:

    y = W x + b * (B_s (d * (A_s x)))      A_s = A[:r, :in], B_s = B[:out, :r]

A [r_max, in_max] and B [out_max, r_max] are drawn once per adapter, sized to the largest
adapted shape (PEFT's layout), from a ``torch.Generator`` seeded with the recorded key
(:data:`PRNG_KEY`, PEFT's ``projection_prng_key``) with PEFT's Kaiming-uniform draw; each layer
uses the top-left slice. The pair lives in one ``VeraProjection`` module that every layer of the
adapter holds, so it is stored (and moved between devices) once. Trained: d (init 0.1) and
b (init 0, so the adapter starts as the identity), i.e. r + out values per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm_lora.lora.base import TRAINABLE_KEYS, LoraLayer, PeftEntry
from vlm_lora.lora.inject import POST_INJECT, iter_lora_layers
from vlm_lora.lora.nodes import _AddLowRank
from vlm_lora.lora.variants import VARIANTS, LoraVariant

PRNG_KEY = 0  # the seed of the shared projections, recorded in the adapter (projection_prng_key)
D_INITIAL = 0.1


class VeraProjection(nn.Module):
    """The frozen shared pair of one adapter: ``A`` [r, in_max], ``B`` [out_max, r] (not saved in
    the model's state dict; the adapter file carries them)."""

    def __init__(self, rank: int, in_max: int, out_max: int, key: int = PRNG_KEY):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.key = key
        self.register_buffer("A", _kaiming_uniform((rank, in_max), generator), persistent=False)
        self.register_buffer("B", _kaiming_uniform((out_max, rank), generator), persistent=False)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraVariant(LoraVariant):
    """VeRA: frozen shared A, B; trained ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] (PEFT's names)."""

    name = "vera"
    peft_type = "VERA"
    uses_lora_ab = False  # no lora_A / lora_B: the shared projection and d, b instead

    def create(self, layer: LoraLayer, name: str) -> None:
        if not hasattr(layer, "vera_lambda_b"):
            layer.vera_lambda_b = nn.ParameterDict()
            layer.vera_lambda_d = nn.ParameterDict()
            layer.vera_projection = nn.ModuleDict()  # the adapter's shared VeraProjection (linked after inject)
        device = layer.base_layer.weight.device
        layer.vera_lambda_b[name] = nn.Parameter(torch.zeros(layer.out_features, device=device))
        layer.vera_lambda_d[name] = nn.Parameter(torch.full((layer.specs[name].rank,), D_INITIAL, device=device))

    @staticmethod
    def slices(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_s [r, in], B_s [out, r]) of the shared projection."""
        if name not in layer.vera_projection:
            raise ValueError(f"VeRA adapter {name!r} has no shared projection; layers get it from inject_lora")
        shared, rank = layer.vera_projection[name], layer.specs[name].rank
        return shared.A[:rank, :layer.in_features], shared.B[:layer.out_features, :rank]

    def linear_forward(self, layer: LoraLayer, name: str, x: torch.Tensor) -> None:
        return None

    def forward_delta(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.slices(layer, name)
        dtype = x.dtype
        x = layer.lora_dropout[name](x)
        hidden = F.linear(x, a.to(dtype)) * layer.vera_lambda_d[name].to(dtype)  # [..., r]
        return F.linear(hidden, b.to(dtype)) * layer.vera_lambda_b[name].to(dtype)

    def add_to(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out`` plus the update. Without dropout, d and b are folded into the LoRA pair
        (d A_s, b B_s) and the LoRA node runs it: backward keeps x and [tokens, r], where
        ``(... ) B_s^T * b`` would keep a [tokens, out] product for b's gradient in every layer."""
        if isinstance(layer.lora_dropout[name], nn.Identity) and base_out.dtype.is_floating_point:
            lora_a, lora_b = self.factors(layer, name)  # differentiable in d and b
            return _AddLowRank.apply(base_out, x, lora_a, lora_b, 1.0)
        return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)

    def factors(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as an exact LoRA pair with scaling 1: (d * A_s [r, in], b * B_s [out, r]) in fp32."""
        a, b = self.slices(layer, name)
        return (layer.vera_lambda_d[name].float()[:, None] * a.float(),
                layer.vera_lambda_b[name].float()[:, None] * b.float())

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        lora_a, lora_b = self.factors(layer, name)
        return lora_b @ lora_a

    def peft_entries(self, layer: LoraLayer, name: str) -> list[PeftEntry]:
        """A plain LoRA of rank r and alpha r (scaling 1), exact; used when the adapter mixes variants."""
        lora_a, lora_b = self.factors(layer, name)
        rank = layer.specs[name].rank
        return [PeftEntry("", lora_a, lora_b, rank, float(rank))]

    def native_tensors(self, layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
        """PEFT VeRA tensors of this layer, by key suffix."""
        return {"vera_lambda_b": layer.vera_lambda_b[name], "vera_lambda_d": layer.vera_lambda_d[name]}

    @staticmethod
    def param_count(in_features: int, out_features: int, rank: int) -> int:
        return rank + out_features


def link_projections(model: nn.Module, adapter_name: str) -> None:
    """Give every VeRA layer of ``adapter_name`` the adapter's shared projection (drawn anew when a
    layer needs a larger one than the current; before training, so nothing trained depends on it)."""
    layers = [layer for _, layer in iter_lora_layers(model)
              if adapter_name in getattr(layer, "variants", {}) and layer.variants[adapter_name].name == "vera"]
    if not layers:
        return
    rank = max(layer.specs[adapter_name].rank for layer in layers)
    in_max = max(layer.in_features for layer in layers)
    out_max = max(layer.out_features for layer in layers)
    shared = next((layer.vera_projection[adapter_name] for layer in layers if adapter_name in layer.vera_projection),
                  None)
    if shared is None or shared.A.shape[0] < rank or shared.A.shape[1] < in_max or shared.B.shape[0] < out_max:
        shared = VeraProjection(rank, in_max, out_max).to(layers[0].base_layer.weight.device)
    for layer in layers:
        layer.vera_projection[adapter_name] = shared


VARIANTS["vera"] = VeraVariant
TRAINABLE_KEYS += ["vera_lambda_b", "vera_lambda_d"]
POST_INJECT.append(link_projections)
