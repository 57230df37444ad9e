"""LoRA layers and the helpers that put them into (and take them out of) a model."""

from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry
from vlm_lora.lora.inject import inject_lora, iter_lora_layers, register_layer_type, unload_lora
from vlm_lora.lora.linear import LoraLinear
from vlm_lora.lora.variants import LoraVariant, get_variant

__all__ = ["AdapterSpec", "LoraLayer", "LoraLinear", "LoraVariant", "PeftEntry", "get_variant", "inject_lora",
           "iter_lora_layers", "register_layer_type", "unload_lora"]
