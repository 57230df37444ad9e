"""Adapter initialisations: kaiming (default), gaussian, and PiSSA / OLoRA, which move the
principal part of W into the adapter and leave the residual in the base.

PiSSA (Meng et al. 2024): W = U S V^T; A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s), base = W - s B A.
OLoRA (Büyükakyüz 2024): W = Q R; A = R_r, B = Q_r, base = W - s B A.
Both record the initial (A0, B0) so that a trained adapter can be saved as a plain LoRA of
rank 2r for the *original* base: s (B A - B0 A0) = s [B, -B0] [A; A0].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:  # type hints only: linear imports this module, never the reverse
    from vlm_lora.lora.base import LoraLayer


def init_kaiming(layer: "LoraLayer", name: str) -> None:
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def init_gaussian(layer: "LoraLayer", name: str) -> None:
    nn.init.normal_(layer.lora_A[name].weight, std=1 / layer.specs[name].rank)
    nn.init.zeros_(layer.lora_B[name].weight)


def _move_principal_part(layer: "LoraLayer", name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    if getattr(weight, "quant_state", None) is not None:
        raise ValueError("PiSSA/OLoRA initialisation needs a full-precision base layer, not a 4-bit one")
    layer.lora_A[name].weight.copy_(lora_a.to(layer.lora_A[name].weight.dtype))
    layer.lora_B[name].weight.copy_(lora_b.to(layer.lora_B[name].weight.dtype))
    residual = weight.float() - layer.scaling[name] * lora_b @ lora_a
    weight.copy_(residual.to(weight.dtype))
    layer.initial_lora[name] = (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone())


@torch.no_grad()
def init_pissa(layer: "LoraLayer", name: str) -> None:
    rank, scaling = layer.specs[name].rank, layer.scaling[name]
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.float(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)
    _move_principal_part(layer, name, root[:, None] * vh[:rank], u[:, :rank] * root[None, :])


@torch.no_grad()
def init_olora(layer: "LoraLayer", name: str) -> None:
    rank = layer.specs[name].rank
    q, r = torch.linalg.qr(layer.base_layer.weight.float())
    _move_principal_part(layer, name, r[:rank].contiguous(), q[:, :rank].contiguous())


INITS: dict[str, Callable[["LoraLayer", str], None]] = {
    "kaiming": init_kaiming, "gaussian": init_gaussian, "pissa": init_pissa, "olora": init_olora,
}
