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
import torch.nn.functional as F
from torch import nn

from vlm_lora.lora.nodes import _AddLowRank, _DoraLinear, _LinearPlusLowRank

if TYPE_CHECKING:  # type hints only: linear imports this module, never the reverse
    from vlm_lora.lora.base import LoraLayer


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


def low_rank_update(layer: "LoraLayer", name: str, x: torch.Tensor) -> torch.Tensor:
    """``B A dropout(x)`` [..., out] computed in x's dtype.

    The adapter weights are fp32 masters; casting them (r x in, out x r) instead of the
    activations (tokens x in) avoids an fp32 copy of every adapted layer's input, and under
    autocast it is exactly the cast autocast would do.
    """
    x = layer.lora_dropout[name](x)
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return F.linear(F.linear(x, weight_a.to(x.dtype)), weight_b.to(x.dtype))


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a (possibly 4-bit) base layer computes in."""
    if getattr(base.weight, "quant_state", None) is not None:
        return getattr(base, "compute_dtype", None) or torch.float32
    return base.weight.dtype


def _fused_compute_dtype(layer: "LoraLayer", x: torch.Tensor) -> torch.dtype | None:
    """The dtype of the one-node path, or None when it does not apply: the base must be a plain
    frozen float linear computing in the activations' dtype, or in the autocast dtype (autocast
    would cast x to it for the base matmul anyway, e.g. after an fp32 LayerNorm)."""
    base = layer.base_layer
    if (type(base).forward is not nn.Linear.forward or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or getattr(base.weight, "quant_state", None) is not None):
        return None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if base.weight.dtype == dtype else None
    return x.dtype if base.weight.dtype == x.dtype else None


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

    def create(self, layer: "LoraLayer", name: str) -> None:
        """Extra per-adapter state, made after A and B are initialised."""

    def forward_delta(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """[..., out] to add to ``base_out`` for input x [..., in]."""
        return low_rank_update(layer, name, x) * layer.scaling[name]

    def linear_forward(self, layer: "LoraLayer", name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer (base + this adapter) in one node, or None when that path does not apply."""
        dtype = _fused_compute_dtype(layer, x)
        if dtype is None or not isinstance(layer.lora_dropout[name], nn.Identity):
            return None
        source, x = x, x.to(dtype)  # no-op unless autocast would have cast it for the base matmul
        group = layer.shared_group
        base = layer.base_layer
        if group is not None and group.eligible(name):
            hidden = group.hidden(layer, name, source, dtype)  # keyed on the siblings' shared input
            return _LinearPlusLowRank.apply(x, hidden, base.weight, base.bias, layer.lora_B[name].weight,
                                            layer.scaling[name])
        return _LinearPlusLowRank.apply(x, None, base.weight, base.bias, layer.lora_B[name].weight,
                                        layer.scaling[name], layer.lora_A[name].weight)

    def add_to(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out`` plus this adapter's update; one fused node when there is no dropout."""
        group = layer.shared_group
        if group is not None and group.eligible(name):
            dtype = base_out.dtype
            hidden = group.hidden(layer, name, x, dtype)  # [N, r], shared with the siblings
            b_scaled = (layer.lora_B[name].weight * layer.scaling[name]).to(dtype)
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden, b_scaled.T)
            return out.view(base_out.shape)
        if isinstance(layer.lora_dropout[name], nn.Identity) and base_out.dtype.is_floating_point:
            return _AddLowRank.apply(base_out, x, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                     layer.scaling[name])
        return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)

    def delta_weight(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        """[out, in] fp32 update ``s B A``."""
        return (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]

    def merge(self, layer: "LoraLayer", name: str, sign: float) -> None:
        weight = layer.base_layer.weight
        weight.copy_((weight.float() + sign * self.delta_weight(layer, name)).to(weight.dtype))


class LoraFAVariant(LoraVariant):
    """LoRA-FA: A is a fixed random projection; only B trains (saves A's optimizer state)."""

    name = "lora_fa"
    trains_A = False


class DoraVariant(LoraVariant):
    """DoRA: a trainable magnitude m [out] times the row-normalised direction ``W + s B A``."""

    name = "dora"

    def create(self, layer: "LoraLayer", name: str) -> None:
        with torch.no_grad():
            norm = self._weight_norm(layer, name)
        magnitude = nn.Parameter(norm.to(layer.lora_A[name].weight.dtype))
        module = nn.Module()
        module.weight = magnitude  # PEFT's layout: lora_magnitude_vector.<name>.weight
        layer.lora_magnitude_vector[name] = module

    def _weight_norm(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        """[out] row norms of W + s B A in fp32, without forming the [out, in] matrix.

        ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T, where
        W A^T comes from the base layer applied to A's rows (so a 4-bit base works unchanged)
        and ||W_o||^2 is cached (the base is frozen). Costs O(out * in * r), like one LoRA matmul.
        B and A enter detached: the paper (section 4.3) treats the norm as a constant in backward.
        """
        a = layer.lora_A[name].weight.detach().float()
        b = layer.lora_B[name].weight.detach().float()
        base = layer.base_layer
        cached = layer.dora_base_norm_sq.get(name)
        if cached is None or cached.device != a.device:
            cached = layer.dora_base_norm_sq[name] = base_weight(base).pow(2).sum(dim=1)
        with torch.autocast(a.device.type, enabled=False):
            wa = base(a.to(_compute_dtype(base)))  # [r, out] = A W^T (+ bias)
            if base.bias is not None:
                wa = wa - base.bias
            s = layer.scaling[name]
            # [out, r]: 2 (W A^T)_o + s B_o (A A^T), so that ||.||^2 = cached + s * B_o . that
            twice_cross_plus = torch.addmm(wa.float().T, b, a @ a.T, beta=2, alpha=s)
            norm_sq = torch.add(cached, (b * twice_cross_plus).sum(dim=1), alpha=s)
        return norm_sq.clamp_min_(0).sqrt_()

    def linear_forward(self, layer: "LoraLayer", name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Base and DoRA update as one node (``_DoraLinear``) for a plain frozen linear without dropout."""
        dtype = _fused_compute_dtype(layer, x)
        if dtype is None or not isinstance(layer.lora_dropout[name], nn.Identity):
            return None
        base = layer.base_layer
        return _DoraLinear.apply(x.to(dtype), base.weight, base.bias, layer.lora_A[name].weight,
                                 layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight,
                                 layer.scaling[name], self._weight_norm(layer, name))

    def forward_delta(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.add_to(layer, name, x, base_out) - base_out

    def add_to(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``b + (m/n) (W x) + (m/n) s B A x`` with the row scale m/n folded into B: one
        [tokens, out] activation (``W x``) is kept for backward, and the add is a GEMM epilogue."""
        dtype = base_out.dtype
        magnitude = layer.lora_magnitude_vector[name].weight
        norm_scale = (magnitude.float() / self._weight_norm(layer, name)).to(dtype)  # [out]
        bias = layer.base_layer.bias
        scaled = (base_out - bias) * norm_scale + bias if bias is not None else base_out * norm_scale
        x = layer.lora_dropout[name](x)
        hidden = x.reshape(-1, x.shape[-1]).to(dtype) @ layer.lora_A[name].weight.to(dtype).T
        b_scaled = (layer.lora_B[name].weight * layer.scaling[name]).to(dtype) * norm_scale[:, None]
        out = torch.addmm(scaled.reshape(-1, scaled.shape[-1]), hidden, b_scaled.T)
        return out.view(base_out.shape)

    def merged_weight(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        """[out, in] fp32: m * (W + s B A) / ||W + s B A||_row."""
        combined = base_weight(layer.base_layer) + self.delta_weight(layer, name)
        magnitude = layer.lora_magnitude_vector[name].weight.float()
        return combined * (magnitude / combined.norm(p=2, dim=1)).unsqueeze(1)

    def merge(self, layer: "LoraLayer", name: str, sign: float) -> None:
        weight = layer.base_layer.weight
        layer.dora_base_norm_sq.clear()  # the base weight changes
        if sign > 0:
            layer.dora_merge_scale[name] = self._weight_norm(layer, name)
            weight.copy_(self.merged_weight(layer, name).to(weight.dtype))
        else:  # W = W' * ||W + sBA|| / m - s B A, with the norm recorded at merge time
            scale = layer.dora_merge_scale.pop(name) / layer.lora_magnitude_vector[name].weight.float()
            weight.copy_((weight.float() * scale.unsqueeze(1) - self.delta_weight(layer, name)).to(weight.dtype))


class FullVariant(LoraVariant):
    """A fully-trained linear (``modules_to_save``) of a named adapter, held as its difference to the
    base, ``full_delta[name]`` (weight [out, in], bias [out]): ``y = W x + b + (W_i - W) x + (b_i - b)``.
    So adapters with different fully-trained connectors can be switched and mixed per sample."""

    name = "full"
    trains_A = False

    def create(self, layer: "LoraLayer", name: str) -> None:
        base = layer.base_layer
        delta = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=torch.float32)
        nn.init.zeros_(delta.weight)
        if delta.bias is not None:
            nn.init.zeros_(delta.bias)
        layer.full_delta[name] = delta

    @torch.no_grad()
    def load_full(self, layer: "LoraLayer", name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set the delta from the adapter's full weight [out, in] (and bias [out])."""
        delta = layer.full_delta[name]
        delta.weight.copy_(weight.float() - base_weight(layer.base_layer))
        if delta.bias is not None and bias is not None:
            delta.bias.copy_(bias.float() - layer.base_layer.bias.float())

    def linear_forward(self, layer: "LoraLayer", name: str, x: torch.Tensor) -> None:
        return None

    def forward_delta(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        delta = layer.full_delta[name]
        bias = delta.bias.to(x.dtype) if delta.bias is not None else None
        return F.linear(x, delta.weight.to(x.dtype), bias)

    def add_to(self, layer: "LoraLayer", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)

    def delta_weight(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        return layer.full_delta[name].weight.float()

    def merge(self, layer: "LoraLayer", name: str, sign: float) -> None:
        super().merge(layer, name, sign)
        bias, delta_bias = layer.base_layer.bias, layer.full_delta[name].bias
        if bias is not None and delta_bias is not None:
            bias.copy_((bias.float() + sign * delta_bias.float()).to(bias.dtype))


VARIANTS: dict[str, type[LoraVariant]] = {"lora": LoraVariant, "lora_fa": LoraFAVariant, "dora": DoraVariant,
                                          "full": FullVariant}


def get_variant(name: str) -> LoraVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]()
