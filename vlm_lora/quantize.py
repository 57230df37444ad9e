"""QLoRA: hold chosen components' base linears in 4-bit (bitsandbytes NF4/FP4) and undo it for merges.

bitsandbytes has CPU kernels, so the same path runs in tests and the quickstart.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora import LoraLayer
from vlm_lora.modeling import DTYPES


def is_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def quantize_linears(model: nn.Module, prefixes: list[str], quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: str = "bfloat16", quant_storage: str | None = None) -> list[str]:
    """Replace every ``nn.Linear`` under ``prefixes`` by a ``bnb.nn.Linear4bit``; returns their paths.

    ``quant_storage``: dtype the packed 4-bit values are stored in (default uint8). FSDP shards only
    floating tensors of the model's dtype, so sharded runs pack into the compute dtype.
    """
    import bitsandbytes as bnb

    storage = DTYPES[quant_storage] if quant_storage else torch.uint8

    replaced = []
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not any(path == p or path.startswith(p + ".") for p in prefixes):
            continue
        device = module.weight.device
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=DTYPES[compute_dtype], compress_statistics=double_quant,
                                      quant_type=quant_type, quant_storage=storage, device="meta")
        # Params4bit quantizes when moved to a device, so the weight never leaves it as a float copy;
        # module= keeps the quant state on the layer too, where bnb finds it when FSDP gathers the weight
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type, quant_storage=storage, module=quantized)
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
        quantized = quantized.to(device)
        if hasattr(module, "loftq_init"):  # LoftQ's adapter init, computed before quantizing (lora/loftq.py)
            quantized.loftq_init = module.loftq_init
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, quantized)
        replaced.append(path)
    return replaced


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every 4-bit linear (also inside LoRA layers) by an ``nn.Linear`` with its
    dequantized weights; returns how many. Merging after this merges into exactly the weights
    the adapter was trained against."""
    import bitsandbytes.functional as bnbf

    count = 0
    for path, module in list(model.named_modules()):
        if not is_4bit(module) or isinstance(module, LoraLayer):
            continue
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias.to(dtype))
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, plain)
        count += 1
    return count
