"""Layer replication (PEFT's ``layer_replication``, after mergekit's passthrough stacking):
the language decoder's layer list is rebuilt from ranges of the original layers, e.g.
``[[0, 4], [2, 5]]`` turns layers 0..4 into ``[0, 1, 2, 3, 2, 3, 4]``. Copies share every base
parameter and buffer with their source layer (no extra base memory); each copy gets a LoRA of
its own when the plan injects adapters, so the model gains depth at the cost of adapter params.

The text config's ``num_hidden_layers`` (and ``layer_types`` where present) follow the new list,
and ``layer_idx`` attributes are renumbered, so the KV cache has one slot per layer.
"""

from __future__ import annotations

import copy
from itertools import chain

from torch import nn

LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")


def decoder_layers_path(model: nn.Module, prefixes: tuple[str, ...] | list[str]) -> str:
    """Path of the decoder's ``nn.ModuleList`` of layers under one of the component's prefixes."""
    for path, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and path.rpartition(".")[2] in LAYER_LIST_NAMES
                and any(path.startswith(p + ".") for p in prefixes)):
            return path
    raise ValueError(f"no decoder layer list ({'/'.join(LAYER_LIST_NAMES)}) under {', '.join(prefixes)}")


def check_layer_map(layer_map: list[list[int]], n_layers: int) -> list[int]:
    """The source layer of every new layer; ValueError naming a bad range."""
    sources = []
    for start, end in layer_map:
        if not 0 <= start < end <= n_layers:
            raise ValueError(f"layer_replication range [{start}, {end}] is not within the decoder's "
                             f"{n_layers} layers (0 <= start < end <= {n_layers})")
        sources.extend(range(start, end))
    return sources


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are the source's own tensors."""
    memo = {id(t): t for t in chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def replicate_layers(model: nn.Module, path: str, layer_map: list[list[int]]) -> list[int]:
    """Rebuild the layer list at ``path`` per ``layer_map``; returns each new layer's source index.
    Records the map as ``model.layer_replication`` (saved in the adapter config)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, name)
    sources = check_layer_map(layer_map, len(layers))
    seen: set[int] = set()
    new_layers = []
    for index, source in enumerate(sources):
        layer = layers[source] if source not in seen else _shared_copy(layers[source])
        seen.add(source)
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = index
        new_layers.append(layer)
    setattr(parent, name, nn.ModuleList(new_layers))
    for config in {id(c): c for c in (getattr(parent, "config", None), _text_config(model)) if c is not None}.values():
        if getattr(config, "num_hidden_layers", None) == len(layers):
            config.num_hidden_layers = len(new_layers)
        if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
            config.layer_types = [config.layer_types[s] for s in sources]
    model.layer_replication = [list(pair) for pair in layer_map]
    return sources


def replicate_decoder(model: nn.Module, prefixes, layer_map: list) -> dict:
    """Apply ``layer_map`` to the language decoder under ``prefixes`` once (a model already
    replicated with the same map is left as is); returns ``{"path", "layers"}`` (source per layer)."""
    layer_map = [list(pair) for pair in layer_map]
    path = decoder_layers_path(model, prefixes)
    done = getattr(model, "layer_replication", None)
    if done is None:
        return {"path": path, "layers": replicate_layers(model, path, layer_map)}
    if done != layer_map:
        raise ValueError(f"the model was already replicated with {done}")
    return {"path": path, "layers": check_layer_map(layer_map, max(end for _, end in layer_map))}


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(config, "text_config", None) or config


def unshare_layers(model: nn.Module, path: str) -> int:
    """Give every replicated layer its own copy of the shared tensors (before merging adapters into
    them, or saving a plain model); returns the number of tensors copied."""
    seen, copied = set(), 0
    for layer in model.get_submodule(path):
        for module in layer.modules():
            for key, tensor in chain(module._parameters.items(), module._buffers.items()):
                if tensor is None:
                    continue
                if id(tensor) in seen:
                    clone = tensor.detach().clone()
                    if isinstance(tensor, nn.Parameter):
                        clone = nn.Parameter(clone, requires_grad=tensor.requires_grad)
                        module._parameters[key] = clone
                    else:
                        module._buffers[key] = clone
                    copied += 1
                else:
                    seen.add(id(tensor))
    return copied
