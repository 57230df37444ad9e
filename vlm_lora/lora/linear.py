"""``LoraLinear``: LoRA around ``nn.Linear``, ``y = W x + b + s * B A dropout(x)``."""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry
from vlm_lora.lora.variants import LoraVariant, get_variant


class LoraLinear(LoraLayer):
    """Adapters are held by name (``lora_A[name]`` is ``nn.Linear(in, r)``, ``lora_B[name]`` is
    ``nn.Linear(r, out)``), so several can live on one layer; state-dict keys
    (``<path>.lora_A.<name>.weight``) match PEFT's.
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, spec: AdapterSpec):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}
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
        for name in self.unmerged_active():
            delta = self.variants[name].forward_delta(
                x, self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name])
            out = out + delta.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """[out, in] fp32 update that merging adapter ``name`` adds to the base weight."""
        return self.variants[name].delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])

    def _merge_adapter(self, name: str, sign: float) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() + sign * self.delta_weight(name)).to(weight.dtype))

    def peft_export(self, name: str) -> list[PeftEntry]:
        spec = self.specs[name]
        return [PeftEntry("", self.lora_A[name].weight, self.lora_B[name].weight, spec.rank, spec.alpha)]

    def load_peft(self, name: str, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        lora_a, lora_b = entries[""]
        with torch.no_grad():
            self.lora_A[name].weight.copy_(lora_a)
            self.lora_B[name].weight.copy_(lora_b)

    def extra_repr(self) -> str:
        ranks = {n: s.rank for n, s in self.specs.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"
