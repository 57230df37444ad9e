"""What every LoRA layer shares: adapters by name, explicit merge/unmerge, disable, PEFT export."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlm_lora.lora.routing import routed_update


# Parameter-name keys that Plan.apply makes trainable; variants in their own modules add theirs.
TRAINABLE_KEYS: list[str] = ["lora_A", "lora_B", "lora_magnitude_vector"]


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter on one module looks like.

    slices: for fused modules (``qkv`` linears, ``nn.MultiheadAttention``), which slices get
        their own rank-``rank`` pair, e.g. ``("q", "v")``; empty for a plain linear.
    slice_order: the fused module's slice layout, e.g. ``("q", "k", "v")``.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    variant: str = "lora"      # lora | lora_fa | dora | vera | dylora | adalora
    init: str = "kaiming"      # kaiming | gaussian | pissa | olora
    rslora: bool = False       # scaling alpha / sqrt(r) instead of alpha / r
    slices: tuple[str, ...] = ()
    slice_order: tuple[str, ...] = ()
    extra: tuple[tuple[str, object], ...] = ()  # variant settings as (key, value) pairs (AdaLoRA's budget)


@dataclass(frozen=True)
class PeftEntry:
    """One PEFT-format LoRA pair: ``suffix`` is appended to the layer path ('' for the layer itself).

    lora_A: [rank, in]; lora_B: [out, rank]; PEFT's scaling is alpha / rank (alpha / sqrt(rank)
    when ``rslora``). ``magnitude`` [out] is DoRA's ``lora_magnitude_vector``.
    """

    suffix: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    rslora: bool = False
    magnitude: torch.Tensor | None = None


class LoraLayer(nn.Module):
    """Base of all LoRA layers. The wrapped module stays at ``base_layer``, untouched except by
    an explicit :meth:`merge`. Subclasses implement ``add_adapter``, ``forward``,
    ``_merge_adapter(name, sign)``, ``peft_export`` and ``load_peft``.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing = None  # SampleRouting while a per-sample adapter map is in use (see routing.py)
        self.routing_side: str | None = None  # "text" | "image": how this layer's input rows map to samples

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads ``module.weight`` (T5, open_clip)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        raise NotImplementedError

    def _merge_adapter(self, name: str, sign: float) -> None:
        """Add ``sign`` times adapter ``name``'s delta to the base weights (in fp32)."""
        raise NotImplementedError

    def peft_export(self, name: str) -> list[PeftEntry]:
        """Adapter ``name`` as PEFT-format pairs, exact (same outputs when PEFT loads them)."""
        raise NotImplementedError

    def load_peft(self, name: str, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Inverse of :meth:`peft_export`: fill adapter ``name`` from ``suffix -> (lora_A, lora_B)``."""
        raise NotImplementedError

    def routed(self, x: torch.Tensor, out: torch.Tensor, update) -> torch.Tensor:
        """``out`` plus ``update(name, x_rows, out_rows)`` on the rows that ``self.routing`` gives each adapter."""
        routes = self.routing.rows(x.shape[:-1], x.device, self.routing_side)
        return routed_update(x, out, routes, self.specs.__contains__, update)

    def delete_adapter(self, name: str) -> None:
        """Drop every piece of adapter ``name`` (weights, specs, scalings) from this layer."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge before deleting it")
        for holder in [self, *self.children()]:
            public = [v for k, v in vars(holder).items() if not k.startswith("_")]
            for value in public + list(holder._modules.values()):
                if isinstance(value, (dict, nn.ModuleDict)) and name in value:
                    del value[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters] if not self.disabled else []

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the adapters into the base weights; forward then skips them."""
        for name in names or self.active_adapters:
            if name not in self.merged_adapters:
                self._merge_adapter(name, +1.0)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to float rounding)."""
        while self.merged_adapters:
            self._merge_adapter(self.merged_adapters.pop(), -1.0)


def adapter_device(weight: torch.Tensor) -> torch.device:
    """Where a layer's adapter weights are created: with the base weight, except that a base built on
    the meta device (sharded loading) gets them on the CPU, so their initialisation draws the same
    random values as on a loaded base."""
    return torch.device("cpu") if weight.is_meta else weight.device
