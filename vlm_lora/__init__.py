"""vlm-lora: component-aware LoRA for vision-language models.

>>> import vlm_lora
>>> p = vlm_lora.plan(model, strategy="language_only", language_decoder={"rank": 8})
>>> print(p)          # a table: component, mode, modules, rank, alpha, lr, trainable params
>>> p.apply(model)    # inject adapters, set requires_grad
"""

from vlm_lora.adapters.multi import adapter_per_sample, delete_adapter, disable_adapters, set_adapter
from vlm_lora.adapters.peft_format import load_adapter, save_adapter
from vlm_lora.lora import AdapterSpec, LoraLinear, inject_lora, unload_lora
from vlm_lora.planner import Plan, PlanError, plan
from vlm_lora.policy import ComponentPolicy, strategies

__version__ = "0.1.0"
__all__ = ["AdapterSpec", "ComponentPolicy", "LoraLinear", "Plan", "PlanError", "adapter_per_sample", "delete_adapter",
           "disable_adapters", "inject_lora", "load_adapter", "plan", "save_adapter", "set_adapter", "strategies",
           "unload_lora"]
