"""``LoraLinear``: LoRA around ``nn.Linear`` (or a bitsandbytes 4-bit linear)."""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry, adapter_device
from vlm_lora.lora.init import INITS
from vlm_lora.lora.variants import LoraVariant, get_variant, lora_scaling


class LoraLinear(LoraLayer):
    """``y = W x + b + sum over adapters of the variant's update`` (plain LoRA: ``s B A dropout(x)``).

    Adapters are held by name (``lora_A[name]`` is ``nn.Linear(in, r)``, ``lora_B[name]`` is
    ``nn.Linear(r, out)``, DoRA adds ``lora_magnitude_vector[name].weight`` [out]), so several
    can live on one layer; state-dict keys match PEFT's.
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, spec: AdapterSpec):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.full_delta = nn.ModuleDict()  # variant "full": W_i - W_base (and bias) of a fully-trained module
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.initial_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA (A0, B0)
        self.dora_merge_scale: dict[str, torch.Tensor] = {}
        self.dora_base_norm_sq: dict[str, torch.Tensor] = {}  # cached ||W_o||^2 of the frozen base
        self.shared_group = None  # SharedInputGroup when siblings (q/k/v, gate/up) share this input
        self.shared_position: int | None = None  # this layer's place in shared_group
        self.add_adapter(adapter_name, spec)

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if spec.init not in INITS:
            raise ValueError(f"unknown init {spec.init!r}; valid: {', '.join(INITS)}")
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        self.variants[name] = variant = get_variant(spec.variant)
        if variant.name == "full" or not getattr(variant, "uses_lora_ab", True):  # own state (dense delta, VeRA)
            self.scaling[name] = 1.0
        else:
            device = adapter_device(self.base_layer.weight)
            dtype = torch.float32  # fp32 master weights; forward casts them to the activations' dtype
            self.lora_A[name] = nn.Linear(self.in_features, spec.rank, bias=False, device=device, dtype=dtype)
            self.lora_B[name] = nn.Linear(spec.rank, self.out_features, bias=False, device=device, dtype=dtype)
            self.scaling[name] = lora_scaling(spec.rank, spec.alpha, spec.rslora)
            with torch.no_grad():
                INITS[spec.init](self, name)
        variant.create(self, name)
        self.active_adapters.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        if self.routing is not None:  # a different adapter per batch row
            return self.routed(x, self.base_layer(x),
                               lambda name, rows, out: self.variants[name].forward_delta(self, name, rows, out))
        active = self.unmerged_active()
        if len(active) == 1:  # the common case: base and adapter in one node when possible
            fused = self.variants[active[0]].linear_forward(self, active[0], x)
            if fused is not None:
                return fused
        out = self.base_layer(x)
        for name in active:
            out = self.variants[name].add_to(self, name, x, out)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """[out, in] fp32 ``s B A`` of adapter ``name`` (for DoRA, before magnitude rescaling)."""
        return self.variants[name].delta_weight(self, name)

    def _merge_adapter(self, name: str, sign: float) -> None:
        if getattr(self.base_layer.weight, "quant_state", None) is not None:
            raise ValueError("cannot merge into a 4-bit layer in place; use `vlm-lora merge` (it dequantizes first)")
        self.variants[name].merge(self, name, sign)

    def peft_export(self, name: str) -> list[PeftEntry]:
        """PEFT pair for adapter ``name``. PiSSA/OLoRA adapters are converted to a rank-2r LoRA
        for the original (pre-initialisation) base: s (B A - B0 A0) = s [B, -B0] [A; A0]."""
        if name in self.full_delta:
            raise ValueError(f"adapter {name!r} trained this module in full; it has no LoRA pair to export")
        if hasattr(self.variants[name], "peft_entries"):  # variants in their own modules (VeRA, DyLoRA, AdaLoRA)
            return self.variants[name].peft_entries(self, name)
        spec, lora_a, lora_b = self.specs[name], self.lora_A[name].weight, self.lora_B[name].weight
        magnitude = self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None
        if name in self.initial_lora:
            a0, b0 = self.initial_lora[name]
            alpha = spec.alpha * (2 ** 0.5 if spec.rslora else 2)  # keeps s for rank 2r
            return [PeftEntry("", torch.cat([lora_a, a0.to(lora_a)], 0), torch.cat([lora_b, -b0.to(lora_b)], 1),
                              2 * spec.rank, alpha, spec.rslora, magnitude)]
        return [PeftEntry("", lora_a, lora_b, spec.rank, spec.alpha, spec.rslora, magnitude)]

    def load_peft(self, name: str, entries: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """``entries[""]`` is (lora_A, lora_B, magnitude or None); for a "full" adapter (weight, bias or None)."""
        if name in self.full_delta:
            self.variants[name].load_full(self, name, *entries[""])
            return
        lora_a, lora_b, *rest = entries[""]
        with torch.no_grad():
            self.lora_A[name].weight.copy_(lora_a)
            self.lora_B[name].weight.copy_(lora_b)
            if rest and rest[0] is not None:
                self.lora_magnitude_vector[name].weight.copy_(rest[0])

    def extra_repr(self) -> str:
        adapters = {n: f"{self.variants[n].name} r={s.rank}" for n, s in self.specs.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={adapters}"
