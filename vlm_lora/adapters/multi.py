"""Several adapters in one model: switch, sum, disable, delete, and a different adapter per sample.

>>> vlm_lora.load_adapter(model, "runs/micro/adapter", adapter_name="micro")
>>> vlm_lora.load_adapter(model, "runs/general/adapter", adapter_name="general")
>>> vlm_lora.set_adapter(model, "micro")                 # only micro
>>> vlm_lora.set_adapter(model, ["micro", "general"])    # their sum
>>> with vlm_lora.disable_adapters(model): ...           # the base model
>>> with vlm_lora.adapter_per_sample(model, ["micro", None, "general"]):
...     model.generate(**batch)                          # row 0 micro, row 1 base, row 2 general

Per-sample routing maps every token (and every vision patch) to its sample once per input
shape (:mod:`vlm_lora.lora.routing`); layers of the vision tower and connector map rows to
images (``images_per_sample``, or packed patches with ``rows_per_image``), the language side to
samples. Which side a layer is on comes from the architecture registry. The call's own batch must
have one row per name (or one name for every row): fewer names than rows is an error, never a
silent repeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vlm_lora.lora import LoraLayer, iter_lora_layers
from vlm_lora.lora.inject import _parent_and_name
from vlm_lora.lora.routing import SampleRouting

TEXT_COMPONENTS = ("language_decoder", "lm_head")  # every other component sees images (tower, Q-Former, connector)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters held by any LoRA layer of ``model``, in first-seen order."""
    names: dict[str, None] = {}
    for _, layer in iter_lora_layers(model):
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def _check_names(model: nn.Module, names) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"unknown adapter {unknown[0]!r}; this model holds {known or 'no adapters'} "
                         f"(load one with vlm_lora.load_adapter(model, DIR, adapter_name=...))")


def _unmerged_layers(model: nn.Module) -> list[LoraLayer]:
    layers = [layer for _, layer in iter_lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise ValueError("adapters are merged into the base weights; unmerge them before switching or mixing")
    return layers


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapters (several: the sum of their updates) on every layer."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for layer in _unmerged_layers(model):
        layer.active_adapters = [n for n in names if n in layer.specs]
        layer.disabled = False


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block; the adapters come back after it."""
    layers = [layer for _, layer in iter_lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; a layer left with no adapter becomes its base module again."""
    _check_names(model, [name])
    for path, layer in list(iter_lora_layers(model)):
        if name not in layer.specs:
            continue
        layer.delete_adapter(name)
        if not layer.specs:
            parent, child = _parent_and_name(model, path)
            setattr(parent, child, layer.base_layer)


def _layer_sides(model: nn.Module) -> dict[str, str | None]:
    """LoRA layer path -> "text" | "image" from the registry; None everywhere for unknown models."""
    from vlm_lora.architectures.registry import detect_architecture

    try:
        architecture = detect_architecture(model)
    except ValueError:  # not a registered VLM: rows are mapped by input shape alone
        return {}
    sides = {}
    for path, _ in iter_lora_layers(model):
        component = architecture.component_of(path)
        sides[path] = None if component is None else ("text" if component in TEXT_COMPONENTS else "image")
    return sides


def _batch_rows(args: tuple, kwargs: dict, positional: bool) -> int | None:
    """Rows of a forward / generate call: ``input_ids`` or ``inputs_embeds``, else (``positional``) the
    first tensor argument; None when there is none."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    first = args[0] if args else None
    return first.shape[0] if positional and isinstance(first, torch.Tensor) and first.dim() else None


@contextmanager
def _checked_calls(model: nn.Module, routing: SampleRouting, positional: bool) -> Iterator[None]:
    """Check each forward's and generate's batch rows against the names (generate before it repeats
    rows for beams; its inner forwards are not checked)."""
    generating = []

    def check_forward(module, args, kwargs):
        if not generating:
            routing.check_batch(_batch_rows(args, kwargs, positional))

    handle = model.register_forward_pre_hook(check_forward, with_kwargs=True)
    original = getattr(model, "generate", None)
    shadowed = vars(model).get("generate")  # an instance attribute (an outer adapter_per_sample's wrapper)

    def generate(*args, **kwargs):
        routing.check_batch(_batch_rows(args, kwargs, positional=True))
        generating.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            generating.pop()

    if original is not None:
        model.generate = generate
    try:
        yield
    finally:
        handle.remove()
        if shadowed is not None:
            model.generate = shadowed
        elif original is not None:
            del model.generate


@contextmanager
def adapter_per_sample(model: nn.Module, names: list[str | None], images_per_sample: list[int] | None = None,
                       rows_per_image: list[int] | None = None) -> Iterator[SampleRouting]:
    """Inside the block, batch row i runs adapter ``names[i]`` (None: the base model), in forward and generate.

    images_per_sample: images of each sample when not one each; rows_per_image: packed vision rows
    (patches) per image for towers that flatten all images into one sequence (Qwen2-VL).
    ``RoutingError`` (a ValueError) when a call's batch has other than ``len(names)`` rows, unless
    ``names`` is a single name (then every row runs it).
    """
    _check_names(model, names)
    layers = list(iter_lora_layers(model))
    _unmerged_layers(model)
    routing = SampleRouting(names, images_per_sample, rows_per_image)
    sides = _layer_sides(model)
    for path, layer in layers:
        layer.routing, layer.routing_side = routing, sides.get(path)
    # with packed or multi-image inputs only input_ids / inputs_embeds say how many samples a call has
    positional = images_per_sample is None and rows_per_image is None
    try:
        with _checked_calls(model, routing, positional):
            yield routing
    finally:
        for _, layer in layers:
            layer.routing = layer.routing_side = None
