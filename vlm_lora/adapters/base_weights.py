"""Which base checkpoint an adapter was trained on: the identity of two of its adapted base weights.

The config cannot tell two checkpoints of one architecture apart; their weights can. For the first and
last adapted modules the sidecar records (in ``base_fingerprint``):

* ``weights_sha256``: sha256 over the weight's shape and its values rounded to bfloat16 (values below
  float16's smallest normal as 0): equal for a bfloat16 or float16 checkpoint loaded in float32,
  bfloat16 or float16;
* ``weights_sample``: 64 of its values at evenly spaced positions (float32). A float32 checkpoint loaded
  in float16 is rounded twice, so its hash differs; then the sample decides: all values within 2^-7
  (relative, two roundings) is the same checkpoint at another precision; one value beyond is another
  checkpoint.

Not recorded, so not checked: 4-bit layers (their packed weights depend on the quantizer), FSDP-sharded
and meta weights, and base weights that PiSSA/OLoRA or a merge changed.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from vlm_lora.lora import LoraLayer

FLOAT16_TINY = 2.0 ** -14  # float16's smallest normal: below it float16 loses bits, so the hash reads 0
SAMPLE_SIZE = 64
SAMPLE_RTOL, SAMPLE_ATOL = 2.0 ** -7, 2.0 ** -13  # above two roundings (float16, then bfloat16)


def hashable_weight(module: nn.Module) -> torch.Tensor | None:
    """The base weight an adapted module's update applies to (``in_proj_weight`` of an MHA), or None where
    it cannot be hashed: 4-bit, FSDP-sharded or meta weights, a base changed by PiSSA/OLoRA or a merge."""
    if isinstance(module, LoraLayer):
        if module.merged_adapters or getattr(module, "initial_lora", None):
            return None
        module = module.base_layer
    weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else getattr(module, "weight", None)
    if (not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta
            or type(weight).__name__ == "DTensor" or getattr(weight, "quant_state", None) is not None):
        return None
    return weight


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of ``weight``'s shape and its values rounded to bfloat16 (|x| < 2^-14 as 0)."""
    values = weight.detach().float()
    values = torch.where(values.abs() < FLOAT16_TINY, torch.zeros_like(values), values)
    digest = hashlib.sha256(json.dumps(list(values.shape)).encode())
    digest.update(values.to(torch.bfloat16).view(torch.int16).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample_positions(numel: int) -> torch.Tensor:
    """``min(SAMPLE_SIZE, numel)`` evenly spaced positions in ``range(numel)`` (int64, on the CPU)."""
    # float32 linspace, as adapters saved before were sampled; past 2^24 elements its last position can round
    # up to ``numel`` (a 4096 x 11008 weight), so it is clamped into range
    return torch.linspace(0, numel - 1, min(SAMPLE_SIZE, numel)).round().long().clamp_(max=numel - 1)


def weight_sample(weight: torch.Tensor) -> list[float]:
    """``SAMPLE_SIZE`` values of the flattened weight at evenly spaced positions, as floats."""
    flat = weight.detach().reshape(-1)
    return flat[sample_positions(flat.numel()).to(flat.device)].float().cpu().tolist()


def weight_records(model: nn.Module, paths: list[str]) -> dict[str, dict]:
    """``{"weights_sha256": {path: sha256}, "weights_sample": {path: values}}`` for the first and last of
    ``paths`` whose base weight can be hashed."""
    modules = dict(model.named_modules())
    hashable = [(path, w) for path in paths if (w := hashable_weight(modules[path])) is not None]
    chosen = hashable[:1] + hashable[-1:] if len(hashable) > 1 else hashable
    return {"weights_sha256": {path: weight_sha256(weight) for path, weight in chosen},
            "weights_sample": {path: weight_sample(weight) for path, weight in chosen}}


def _same_values(ours: list[float], theirs: list[float]) -> bool:
    return len(ours) == len(theirs) and all(abs(a - b) <= SAMPLE_RTOL * abs(b) + SAMPLE_ATOL
                                            for a, b in zip(ours, theirs))


def weights_mismatch(model: nn.Module, meta: dict) -> str | None:
    """Which adapted module's base weights differ from those the adapter was trained on, as a sentence;
    None when they agree (or differ by precision alone) or cannot be compared (no records, 4-bit layers)."""
    fingerprint = meta.get("base_fingerprint") or {}
    hashes, samples = fingerprint.get("weights_sha256") or {}, fingerprint.get("weights_sample") or {}
    modules = dict(model.named_modules())
    for path, theirs in hashes.items():
        weight = hashable_weight(modules[path]) if path in modules else None
        if weight is None:
            continue
        ours = weight_sha256(weight)
        if ours == theirs or (path in samples and _same_values(weight_sample(weight), samples[path])):
            continue  # the same values, or the same checkpoint loaded at another precision
        return (f"the base weights of {path} differ from those the adapter was trained on (sha256 "
                f"{theirs[:12]} vs {ours[:12]}): the same architecture, another checkpoint?")
    return None
