"""Put LoRA layers into a model at given module paths, find them, and take them out again."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from vlm_lora.lora.base import AdapterSpec, LoraLayer
from vlm_lora.lora.linear import LoraLinear

DEFAULT_ADAPTER = "default"

# Which LoRA layer wraps which module: (predicate on module and spec, layer class), first match wins.
# Fused-qkv and nn.MultiheadAttention layers register themselves here.
LAYER_TYPES: list[tuple[Callable[[nn.Module, AdapterSpec], bool], type[LoraLayer]]] = [
    (lambda module, spec: isinstance(module, nn.Linear) and not spec.slices, LoraLinear),
]


# Called as hook(model, adapter_name) after every inject_lora, for variants whose layers share
# state across the model (VeRA's projections).
POST_INJECT: list[Callable[[nn.Module, str], None]] = []


def register_layer_type(predicate: Callable[[nn.Module, AdapterSpec], bool], layer_class: type[LoraLayer]) -> None:
    LAYER_TYPES.insert(0, (predicate, layer_class))


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def inject_lora(model: nn.Module, specs: dict[str, AdapterSpec], adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Wrap each module named in ``specs`` (module path -> spec) with the matching LoRA layer.

    A path that already holds a LoRA layer gets one more adapter. Returns the paths wrapped.
    """
    for path, spec in specs.items():
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            module.add_adapter(adapter_name, spec)
            continue
        layer_class = next((cls for match, cls in LAYER_TYPES if match(module, spec)), None)
        if layer_class is None:
            raise TypeError(f"cannot put LoRA on {path!r}: no LoRA layer for {type(module).__name__}"
                            + (f" with slices {spec.slices}" if spec.slices else ""))
        parent, child = _parent_and_name(model, path)
        setattr(parent, child, layer_class(module, adapter_name, spec))
    for hook in POST_INJECT:
        hook(model, adapter_name)
    return list(specs)


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
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
