"""Put LoRA layers into a model at given module paths, find them, and take them out again."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from vlm_lora.lora.linear import AdapterSpec, LoraLinear

DEFAULT_ADAPTER = "default"


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def inject_lora(model: nn.Module, specs: dict[str, AdapterSpec], adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Wrap each ``nn.Linear`` named in ``specs`` (module path -> spec) with a LoRA layer.

    A path that already holds a LoRA layer gets one more adapter. Returns the paths wrapped.
    """
    for path, spec in specs.items():
        module = model.get_submodule(path)
        if isinstance(module, LoraLinear):
            module.add_adapter(adapter_name, spec)
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"cannot put LoRA on {path!r}: it is a {type(module).__name__}, not nn.Linear")
        parent, child = _parent_and_name(model, path)
        setattr(parent, child, LoraLinear(module, adapter_name, spec))
    return list(specs)


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield path, module


def unload_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every LoRA layer by its base layer, merging the adapters first if ``merge``."""
    for path, layer in list(iter_lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, child = _parent_and_name(model, path)
        setattr(parent, child, layer.base_layer)
    return model
