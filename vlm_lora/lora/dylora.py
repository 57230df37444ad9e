"""DyLoRA (Valipour et al. 2023): one LoRA of rank r trained so that every prefix of it works.

Each optimizer step samples b in 1..r and the step uses only the first b components,
``s_b B[:, :b] A[:b] x`` with ``s_b = alpha / b``, so the ranks are ordered (nested). After
training any K <= r can be chosen (:func:`set_rank`): merge, export and eval then use the first
K components, and the exported adapter is a plain LoRA of rank K (alpha unchanged) that PEFT loads.

The sample is one uniform draw u per step, shared by every DyLoRA layer: b = ceil(u r) for a
layer of rank r (components with different ranks truncate at the same fraction). It is drawn
from ``seed`` and the step number, so a resumed run and a recomputed (checkpointed) forward see
the same b. Set by the step hook the training loop attaches (``lora.hooks``) and used only while
the layer is in training mode; in eval mode the layer uses the chosen K (default r).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from vlm_lora.lora.base import LoraLayer, PeftEntry
from vlm_lora.lora.hooks import STEP_HOOKS
from vlm_lora.lora.inject import iter_lora_layers
from vlm_lora.lora.variants import VARIANTS, LoraVariant, low_rank_update


class DyLoraVariant(LoraVariant):
    """Nested-rank LoRA: ``layer.dylora_sample[name]`` is the training step's b, ``layer.dylora_rank[name]``
    the K of eval, merge and export."""

    name = "dylora"

    def create(self, layer: LoraLayer, name: str) -> None:
        if not hasattr(layer, "dylora_rank"):
            layer.dylora_rank, layer.dylora_sample = {}, {}
        layer.dylora_rank[name] = layer.specs[name].rank

    @staticmethod
    def rank(layer: LoraLayer, name: str) -> int:
        if layer.training and name in layer.dylora_sample:
            return layer.dylora_sample[name]
        return layer.dylora_rank.get(name, layer.specs[name].rank)

    def _scaling(self, layer: LoraLayer, name: str, rank: int) -> float:
        spec = layer.specs[name]
        return spec.alpha / math.sqrt(rank) if spec.rslora else spec.alpha / rank

    def linear_forward(self, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if self.rank(layer, name) < layer.specs[name].rank:
            return None
        return super().linear_forward(layer, name, x)  # the full rank: plain LoRA's fast path

    def add_to(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.rank(layer, name) < layer.specs[name].rank:
            return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)
        return super().add_to(layer, name, x, base_out)

    def forward_delta(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        rank = self.rank(layer, name)
        if rank == layer.specs[name].rank:
            return low_rank_update(layer, name, x) * layer.scaling[name]
        x = layer.lora_dropout[name](x)
        lora_a, lora_b = layer.lora_A[name].weight[:rank], layer.lora_B[name].weight[:, :rank]
        hidden = x @ lora_a.to(x.dtype).T
        return (hidden @ lora_b.to(x.dtype).T) * self._scaling(layer, name, rank)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """[out, in] fp32 ``s_K B[:, :K] A[:K]`` at the chosen K."""
        rank = layer.dylora_rank[name]
        lora_a, lora_b = layer.lora_A[name].weight[:rank].float(), layer.lora_B[name].weight[:, :rank].float()
        return (lora_b @ lora_a) * self._scaling(layer, name, rank)

    def peft_entries(self, layer: LoraLayer, name: str) -> list[PeftEntry]:
        """A plain LoRA of the chosen K: the first K rows of A, columns of B; alpha as trained."""
        rank, spec = layer.dylora_rank[name], layer.specs[name]
        return [PeftEntry("", layer.lora_A[name].weight[:rank], layer.lora_B[name].weight[:, :rank], rank,
                          spec.alpha, spec.rslora)]


def dylora_layers(model: nn.Module, adapter_name: str | None = None):
    for path, layer in iter_lora_layers(model):
        for name, variant in getattr(layer, "variants", {}).items():
            if variant.name == "dylora" and adapter_name in (None, name):
                yield path, layer, name


def set_rank(model: nn.Module, rank: int, adapter_name: str = "default", as_dylora: bool = False) -> int:
    """Use the first ``rank`` components of every DyLoRA layer of ``adapter_name`` (forward,
    merge, export). ``as_dylora``: also treat plain LoRA layers of it as DyLoRA (a saved DyLoRA
    adapter loads as plain LoRA). Returns the number of layers set; raises ValueError when a
    layer's rank is below ``rank``."""
    if as_dylora:
        for _, layer in iter_lora_layers(model):
            variant = getattr(layer, "variants", {}).get(adapter_name)
            if variant is not None and variant.name == "lora" and layer.specs[adapter_name].init in ("kaiming",
                                                                                                    "gaussian"):
                layer.specs[adapter_name] = replace(layer.specs[adapter_name], variant="dylora")
                layer.variants[adapter_name] = dylora = DyLoraVariant()
                dylora.create(layer, adapter_name)
    count = 0
    for path, layer, name in dylora_layers(model, adapter_name):
        if rank < 1 or rank > layer.specs[name].rank:
            raise ValueError(f"--rank {rank}: {path} has a DyLoRA adapter of rank {layer.specs[name].rank}; "
                             f"choose 1..{layer.specs[name].rank}")
        layer.dylora_rank[name] = rank
        count += 1
    return count


def sample_ranks(model: nn.Module, step: int, total_steps: int, seed: int = 0) -> None:
    """The step hook: every DyLoRA layer uses b = ceil(u r) components in step ``step``."""
    u = torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).item()
    for _, layer, name in dylora_layers(model):
        full = layer.specs[name].rank
        layer.dylora_sample[name] = min(full, max(1, math.ceil(u * full)))


VARIANTS["dylora"] = DyLoraVariant
STEP_HOOKS.append(sample_ranks)
