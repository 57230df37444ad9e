"""LoRA layers and the helpers that put them into (and take them out of) a model."""

from vlm_lora.lora.inject import inject_lora, iter_lora_layers, unload_lora
from vlm_lora.lora.linear import AdapterSpec, LoraLinear
from vlm_lora.lora.variants import LoraVariant, get_variant

__all__ = ["AdapterSpec", "LoraLinear", "LoraVariant", "get_variant", "inject_lora", "iter_lora_layers", "unload_lora"]
