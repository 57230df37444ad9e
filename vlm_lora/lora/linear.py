"""``LoraLinear``: a LoRA wrapper around ``nn.Linear`` that keeps the base layer intact."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlm_lora.lora.variants import LoraVariant, get_variant


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter on one layer looks like."""

    rank: int
    alpha: float
    dropout: float = 0.0
    variant: str = "lora"


class LoraLinear(nn.Module):
    """``y = base(x) + sum over active adapters of s * B A dropout(x)``.

    Adapters are held by name (``lora_A[name]`` is ``nn.Linear(in, r)``, ``lora_B[name]`` is
    ``nn.Linear(r, out)``), so several adapters can live on one layer; the state-dict keys
    (``<path>.lora_A.<name>.weight``) match PEFT's. The base layer stays at ``base_layer`` and
    is only changed by an explicit :meth:`merge`, which :meth:`unmerge` undoes.
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, spec: AdapterSpec):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.add_adapter(adapter_name, spec)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, spec.rank, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(spec.rank, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        variant = get_variant(spec.variant)
        variant.init_weights(self.lora_A[name], self.lora_B[name])
        self.variants[name] = variant
        self.scaling[name] = variant.scaling(spec.rank, spec.alpha)
        self.specs[name] = spec
        self.active_adapters.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        out = self.base_layer(x)
        if self.disabled:
            return out
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            delta = self.variants[name].forward_delta(
                x, self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name])
            out = out + delta.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """[out, in] fp32 update that merging adapter ``name`` adds to the base weight."""
        return self.variants[name].delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' deltas into ``base_layer.weight`` (in fp32, then cast back)."""
        for name in names or self.active_adapters:
            if name in self.merged_adapters:
                continue
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again (exact up to float rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = {n: s.rank for n, s in self.specs.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"
