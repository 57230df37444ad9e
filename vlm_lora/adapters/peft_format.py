"""Save and load adapters in PEFT's file format.

``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules`` as full
module paths, ``rank_pattern``/``alpha_pattern`` for per-component ranks, ``modules_to_save``)
and ``adapter_model.safetensors`` with ``base_model.model.<path>.lora_A.weight`` [r, in],
``.lora_B.weight`` [out, r] and fully-trained modules as plain ``base_model.model.<path>`` tensors.
``PeftModel.from_pretrained`` loads what we write; we load what PEFT writes.

vlm-lora's extras go to a sidecar, ``vlm_lora.json`` (PEFT warns about unknown keys in
``adapter_config.json``, so nothing is added there): slice layouts of fused layers, the 4-bit
layout for merges, and the base fingerprint: ``base_fingerprint`` = ``{model_class,
config_sha256, module_shapes: {path: [out, in]}}`` plus ``base_config``, the base's config
without keys that do not affect weights. ``load_adapter`` checks it before injecting anything:
a different shape of an adapted module is an error naming the module and both shapes; a config
difference that changes no adapted shape (``vocab_size``, ...) is a warning. Adapters without
the sidecar (made by PEFT) load without the check.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm_lora.lora import AdapterSpec, LoraLayer, PeftEntry, inject_lora, iter_lora_layers
from vlm_lora.adapters.fingerprint import AdapterError, weight_config, base_fingerprint, check_base
from vlm_lora.adapters.peft_native import (NATIVE_TYPES, STATE_NAME, native_to_lora, to_native, training_state,
                                           use_dylora_rank)
from vlm_lora.lora.inject import DEFAULT_ADAPTER
from vlm_lora.planner import has_module, named_params_at

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "vlm_lora.json"  # vlm-lora extras (slice layouts, base fingerprint); PEFT ignores it

log = logging.getLogger("vlm_lora")


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str,
                 modules_to_save: list[str], adapter_name: str = DEFAULT_ADAPTER,
                 never_saved: list[str] = (), extra_meta: dict | None = None) -> Path:
    """Write ``adapter_name`` and the fully-trained modules of ``model`` as a PEFT adapter.

    Fused layers (``qkv`` slices, ``nn.MultiheadAttention``) export as exact PEFT equivalents;
    their slice layout goes to ``vlm_lora.json`` beside the PEFT files so that vlm-lora can
    rebuild the per-slice layers (PEFT ignores that file).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, dropouts, sliced, inits, variants = {}, {}, [], {}, {}, {}
    entries: dict[str, PeftEntry] = {}
    adapted: list[str] = []
    for path, layer in iter_lora_layers(model):
        if adapter_name not in layer.specs:
            continue
        adapted.append(path)
        spec = layer.specs[adapter_name]
        dropouts.append(spec.dropout)
        inits[spec.init] = inits.get(spec.init, 0) + 1
        variants[spec.variant] = variants.get(spec.variant, 0) + 1
        if spec.slices:
            sliced[path] = {"rank": spec.rank, "alpha": spec.alpha, "slices": list(spec.slices),
                            "slice_order": list(spec.slice_order)}
        for entry in layer.peft_export(adapter_name):
            entries[f"{path}.{entry.suffix}" if entry.suffix else path] = entry
    use_dora = _one_setting(entries, lambda e: e.magnitude is not None, "DoRA")
    use_rslora = bool(entries) and all(e.rslora for e in entries.values())
    for target, entry in entries.items():
        # mixed rsLoRA/plain adapters: express alpha / sqrt(r) as an equivalent alpha / r
        alpha = entry.alpha * entry.rank ** 0.5 if entry.rslora and not use_rslora else entry.alpha
        ranks[target], alphas[target] = entry.rank, alpha
        tensors[f"{PREFIX}{target}.lora_A.weight"] = entry.lora_A
        tensors[f"{PREFIX}{target}.lora_B.weight"] = entry.lora_B
        if entry.magnitude is not None:
            tensors[f"{PREFIX}{target}.lora_magnitude_vector"] = entry.magnitude
    for prefix in modules_to_save:
        for name, param in named_params_at(model, prefix):
            if not any(name.startswith(n + ".") for n in never_saved):
                tensors[PREFIX + name] = param
    # PEFT's modules_to_save names modules; bare parameters (BLIP-2 query_tokens) are saved as
    # tensors but PEFT will not restore them
    modules_to_save = [p for p in modules_to_save if has_module(model, p)]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    r = _most_common(list(ranks.values())) if ranks else 8
    alpha = _most_common(list(alphas.values())) if alphas else 16
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(dropouts) if dropouts else 0.0,
        "target_modules": sorted(ranks),
        "rank_pattern": {p: v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {p: v for p, v in sorted(alphas.items()) if v != alpha},
        "modules_to_save": list(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,  # PiSSA/OLoRA adapters are saved converted, for the original base
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "inference_mode": True,
    }
    config, tensors = to_native(model, adapter_name, config, tensors)  # VeRA, AdaLoRA: PEFT's own format
    if getattr(model, "layer_replication", None):  # PEFT rebuilds the layer list before loading
        config["layer_replication"] = model.layer_replication
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    base_config = weight_config(model)
    meta = {"sliced_layers": sliced, "inits": inits, "variants": variants, **(extra_meta or {}),
            **({"loftq": model.loftq} if getattr(model, "loftq", None) else {}),  # the LoftQ base (loftq_report)
            "base_fingerprint": base_fingerprint(model, adapted, base_config), "base_config": base_config}
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    state = training_state(model, adapter_name)  # VeRA/AdaLoRA layers: what resuming needs
    if state:
        save_file(state, str(out_dir / STATE_NAME), metadata={"format": "pt"})
    return out_dir


def _one_setting(entries: dict[str, PeftEntry], test, what: str) -> bool:
    """PEFT sets DoRA for a whole adapter: all layers or none."""
    flags = {test(e) for e in entries.values()}
    if len(flags) > 1:
        raise AdapterError(f"{what} is on for some adapted modules and off for others; PEFT's format sets it "
                           f"for the whole adapter: use it on every LoRA component or on none")
    return flags == {True}


def _matches(path: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _pattern_value(path: str, patterns: dict, default):
    """PEFT's rule: a pattern key matches the path's end on a module boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter folder: {CONFIG_NAME} is missing")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA" and config.get("peft_type") not in NATIVE_TYPES:
        raise AdapterError(f"{config_file}: peft_type is {config.get('peft_type')!r}; "
                           f"valid: LORA, {', '.join(NATIVE_TYPES)}")
    return config


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """PEFT target path -> (lora_A [r, in], lora_B [out, r], DoRA magnitude [out] or None)."""
    return {k[len(PREFIX):-len(".lora_A.weight")]: (v, state[k.replace(".lora_A.", ".lora_B.")],
                                                    state.get(k.replace(".lora_A.weight", ".lora_magnitude_vector")))
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def take_layer_entries(pairs: dict[str, tuple], path: str) -> dict[str, tuple]:
    """Remove the pairs of the layer at ``path`` (itself and its sub-paths, e.g. an MHA's
    ``base_layer.out_proj``) from ``pairs``; returns them keyed by suffix ('' for the layer)."""
    mine = [t for t in pairs if t == path or t.startswith(path + ".")]
    return {t[len(path) + 1:]: pairs.pop(t) for t in mine}


def read_meta(adapter_dir: str | Path) -> dict:
    """vlm-lora's extras beside the PEFT files (slice layouts, quantization); {} for PEFT-made adapters."""
    return _read_meta(Path(adapter_dir))


def check_adapter_fits(model: nn.Module, adapter_dir: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``AdapterError`` unless the adapter at ``adapter_dir`` fits ``model`` (its base fingerprint, every targeted
    module present with the shapes of its LoRA pair); changes nothing. Returns (config, sidecar meta, tensors)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    origin = config.get("base_model_name_or_path")
    meta = _read_meta(adapter_dir)
    check_base(model, meta, origin)
    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    if config["peft_type"] != "LORA":  # VeRA, AdaLoRA: checked and loaded as the equivalent LoRA (the same update)
        config, state = native_to_lora(model, config, state)
    if config.get("layer_replication") and getattr(model, "layer_replication", None) is None:
        return config, meta, state  # its copied layers exist once load_adapter replicates the decoder
    sliced, modules, pairs = meta.get("sliced_layers", {}), dict(model.named_modules()), lora_pairs(state)
    targets = list(sliced) + [t for t in pairs if not any(t == p or t.startswith(p + ".") for p in sliced)]
    if targets and not any(t in modules for t in targets):
        raise AdapterError(f"this {type(model).__name__} has none of the {len(targets)} modules the adapter targets "
                           f"(e.g. {targets[0]!r}); the adapter was made for {origin!r}")
    for path in targets:
        if path not in modules:
            raise AdapterError(f"adapter targets module {path!r}, which this model does not have; "
                               f"the adapter was made for {origin!r}")
    for path in targets[len(sliced):]:
        (lora_a, lora_b, _), module = pairs[path], modules[path]
        module = module.base_layer if isinstance(module, LoraLayer) else module
        if not isinstance(module, nn.Linear) or lora_a.shape[1] != module.in_features \
                or lora_b.shape[0] != module.out_features:
            shape = (getattr(module, "out_features", "?"), getattr(module, "in_features", "?"))
            raise AdapterError(f"adapter does not fit {path!r}: its update is ({lora_b.shape[0]}, {lora_a.shape[1]}) "
                               f"[out, in] but the module is {shape}; the adapter was made for {origin!r}")
    return config, meta, state


def _read_meta(adapter_dir: Path) -> dict:
    meta_file = adapter_dir / META_NAME
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def _load_full_linears(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str,
                       origin: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load the fully-trained ``nn.Linear`` weights among ``tensors`` as "full" adapters (their
    difference to the base) named ``adapter_name``; returns (the other tensors, the linears' paths)."""
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    for key, tensor in tensors.items():
        path, _, leaf = (key[len(PREFIX):] if key.startswith(PREFIX) else key).rpartition(".")
        by_module.setdefault(path, {})[leaf] = tensor
        keys_of.setdefault(path, []).append(key)
    rest, paths = dict(tensors), []
    for path, leaves in by_module.items():
        module = modules.get(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not (type(base) is nn.Linear and set(leaves) <= {"weight", "bias"} and "weight" in leaves):
            continue
        if tuple(leaves["weight"].shape) != tuple(base.weight.shape):
            raise AdapterError(f"adapter tensor {path}.weight has shape {tuple(leaves['weight'].shape)} but the "
                               f"model's is {tuple(base.weight.shape)}; the adapter was made for {origin!r}")
        inject_lora(model, {path: AdapterSpec(rank=0, alpha=1.0, variant="full")}, adapter_name)
        model.get_submodule(path).load_peft(adapter_name, {"": (leaves["weight"], leaves.get("bias"))})
        paths.append(path)
        for key in keys_of[path]:
            del rest[key]
    return rest, paths


def replicate_for_adapter(model: nn.Module, layer_map: list) -> None:
    """Rebuild the language decoder's layer list as the adapter was trained (``layer_replication``)."""
    from vlm_lora.architectures.registry import detect_architecture
    from vlm_lora.architectures.replication import replicate_decoder

    try:
        replicate_decoder(model, detect_architecture(model).components["language_decoder"].prefixes, layer_map)
    except ValueError as error:
        raise AdapterError(f"adapter layer_replication {layer_map}: {error}") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = DEFAULT_ADAPTER,
                 full_as_delta: bool | None = None, label: str | None = None, rank: int | None = None) -> list[str]:
    """Inject and load a PEFT-format LoRA adapter into ``model``; returns the adapted paths.

    Fails with ``AdapterError`` naming the module when the adapter does not fit this base; with a
    base fingerprint in the sidecar that is checked first, before anything is injected.

    full_as_delta: fully-trained linears (``modules_to_save``, e.g. the connector) become a "full"
    adapter ``adapter_name`` on that layer (their difference to the base), so several adapters can
    be switched and mixed per sample; otherwise they overwrite the base weights. Default: on for
    any name but ``"default"``. Other fully-trained tensors (norms, embeddings) always overwrite.

    rank: a DyLoRA adapter (``variants`` in the sidecar) uses its first ``rank`` components.
    """
    config = read_adapter_config(adapter_dir)
    if config.get("layer_replication") and getattr(model, "layer_replication", None) is None:
        replicate_for_adapter(model, config["layer_replication"])
    config, meta, state = check_adapter_fits(model, adapter_dir)
    origin = config.get("base_model_name_or_path")
    sliced = meta.get("sliced_layers", {})
    pairs = lora_pairs(state)
    specs: dict[str, AdapterSpec] = {}
    entries: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, info in sliced.items():
        specs[path] = AdapterSpec(rank=info["rank"], alpha=info["alpha"], slices=tuple(info["slices"]),
                                  slice_order=tuple(info["slice_order"]))
        entries[path] = take_layer_entries(pairs, path)
    for path, (lora_a, lora_b, magnitude) in pairs.items():
        layer_rank = _pattern_value(path, config.get("rank_pattern") or {}, config["r"])
        if layer_rank != lora_a.shape[0]:
            raise AdapterError(f"{path}: config says rank {layer_rank} but lora_A has {lora_a.shape[0]} rows")
        alpha = _pattern_value(path, config.get("alpha_pattern") or {}, config["lora_alpha"])
        specs[path] = AdapterSpec(rank=layer_rank, alpha=alpha, rslora=bool(config.get("use_rslora")),
                                  variant="dora" if config.get("use_dora") else "lora")
        entries[path] = {"": (lora_a, lora_b, magnitude)}
    try:
        inject_lora(model, specs, adapter_name)
    except TypeError as error:
        raise AdapterError(f"{error} (adapter made for {origin!r})") from None
    for path, layer_entries in entries.items():
        try:
            model.get_submodule(path).load_peft(adapter_name, layer_entries)
        except (ValueError, RuntimeError) as error:
            raise AdapterError(f"adapter does not fit {path!r}: {error}; the adapter was made for {origin!r}") from None
    if rank is not None:
        use_dylora_rank(model, adapter_dir, meta, rank, adapter_name)

    full = {key: tensor for key, tensor in state.items()
            if not (".lora_A." in key or ".lora_B." in key or key.endswith(".lora_magnitude_vector"))}
    if full_as_delta if full_as_delta is not None else adapter_name != DEFAULT_ADAPTER:
        full, full_paths = _load_full_linears(model, full, adapter_name, origin)
        specs.update(dict.fromkeys(full_paths))
        if full:
            log.warning("adapter %r: %d fully-trained tensors that are not linears (e.g. %s) overwrite the base "
                        "for every adapter", label or adapter_name, len(full), next(iter(full)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in full.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name not in params:
                parent, _, leaf = name.rpartition(".")
                wrapped = f"{parent}.base_layer.{leaf}"
                if wrapped not in params:
                    raise AdapterError(f"adapter tensor {key!r} has no place in this model (made for {origin!r})")
                name = wrapped
            if params[name].shape != tensor.shape:
                raise AdapterError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)} but the model's "
                                   f"{name} is {tuple(params[name].shape)}; the adapter was made for {origin!r}")
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(specs)
