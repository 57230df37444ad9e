"""LoRA layers and the helpers that put them into (and take them out of) a model.

Owns the adapter math: ``LoraLinear``, ``FusedLinearLora`` (per-slice q/k/v in a fused
projection), ``LoraMultiheadAttention``, the variants (LoRA, DoRA, LoRA-FA; VeRA, DyLoRA and AdaLoRA in
their own modules, registered on import) and inits (LoftQ in ``loftq``), the step ``hooks``, and the
shared-input groups, and the per-sample routing (``routing``: a different adapter per batch row). The lowest layer: imports only torch (within the package, ``base`` <-
``init``/``variants`` <- ``linear`` <- ``fused``/``mha``/``inject``/``shared``); every other
subpackage may import it.
"""

from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry
from vlm_lora.lora.inject import inject_lora, iter_lora_layers, register_layer_type, unload_lora
from vlm_lora.lora.linear import LoraLinear
from vlm_lora.lora.variants import LoraVariant, get_variant
from vlm_lora.lora import fused, mha  # noqa: E402,F401  (register the fused-qkv and MHA layer types)
from vlm_lora.lora import adalora, dylora, loftq, vera  # noqa: E402,F401  (register the variants kept in their own modules)
from vlm_lora.lora.fused import FusedLinearLora  # noqa: E402
from vlm_lora.lora.mha import LoraMultiheadAttention  # noqa: E402

__all__ = ["AdapterSpec", "FusedLinearLora", "LoraLayer", "LoraLinear", "LoraMultiheadAttention", "LoraVariant", "PeftEntry", "get_variant", "inject_lora",
           "iter_lora_layers", "register_layer_type", "unload_lora"]
