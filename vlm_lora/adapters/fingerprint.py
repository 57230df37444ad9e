"""The base fingerprint: which base an adapter was trained on, and whether a model is that base.

``base_fingerprint`` = ``{model_class, config_sha256, module_shapes: {path: [out, in]}, weights_sha256:
{path: sha256}, weights_sample: {path: [64 values]}}``, written to the ``vlm_lora.json`` sidecar with
``base_config`` (the config without keys that do not affect the weights). ``check_base`` runs before anything is injected: a different shape of an
adapted module is an error naming the module and both shapes; a config difference that changes no adapted
shape (``vocab_size``, ...) is a warning.

``weights_sha256`` / ``weights_sample`` identify the base weights of the first and last adapted modules
(:mod:`vlm_lora.adapters.base_weights`), so that another checkpoint of the same architecture (same
config, other weights) is noticed: load and eval warn, merge refuses unless forced. Adapters without
them (older ones, PEFT's) are not checked.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from vlm_lora.adapters.base_weights import weight_records, weights_mismatch
from vlm_lora.lora import LoraLayer

log = logging.getLogger("vlm_lora")

# config keys that do not change the weights (names, versions, dtype, runtime switches)
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                       "_commit_hash", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
                       "torchscript", "quantization_config"}
SHOWN_CONFIG_DIFFS = 5


class AdapterError(ValueError):
    """An adapter that cannot be read or does not fit the model it is loaded into."""


def _filter_config(value):
    """``value`` without ``IGNORED_CONFIG_KEYS`` and ``_attn_implementation*`` keys, at every level."""
    if isinstance(value, dict):
        return {k: _filter_config(v) for k, v in value.items()
                if k not in IGNORED_CONFIG_KEYS and not k.startswith("_attn_implementation")}
    return value


def weight_config(model: nn.Module) -> dict | None:
    """The base's config as a dict without keys that do not affect weights; None when it has none.

    transformers: ``config.to_json_string(use_diff=False)``, filtered; timm: its architecture name
    and number of classes.
    """
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        return _filter_config(json.loads(config.to_json_string(use_diff=False)))
    timm_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(timm_cfg, dict) and timm_cfg.get("architecture"):
        return {"architecture": timm_cfg["architecture"],
                "num_classes": getattr(model, "num_classes", timm_cfg.get("num_classes"))}
    return None


def _config_sha256(config: dict | None) -> str | None:
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def module_shape(module: nn.Module) -> list[int] | None:
    """[out, in] of an adapted module's base layer; ``in_proj_weight``'s shape for nn.MultiheadAttention."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    if isinstance(module, nn.MultiheadAttention):
        return [3 * module.embed_dim, module.embed_dim]
    if isinstance(module, nn.Linear):  # also 4-bit linears, whose stored weight is packed
        return [module.out_features, module.in_features]
    weight = getattr(module, "weight", None)
    return list(weight.shape) if isinstance(weight, torch.Tensor) else None


def base_fingerprint(model: nn.Module, paths: list[str], config: dict | None = None,
                     hash_weights: bool = True) -> dict:
    """What an adapter needs of its base: class name, config hash, the shapes of ``paths`` and the hashes
    and samples of two of their base weights (``hash_weights=False``: none, e.g. for a dequantized 4-bit
    base; see :mod:`vlm_lora.adapters.base_weights`)."""
    modules = dict(model.named_modules())
    return {"model_class": type(model).__name__,
            "config_sha256": _config_sha256(config if config is not None else weight_config(model)),
            "module_shapes": {path: module_shape(modules[path]) for path in paths},
            **(weight_records(model, paths) if hash_weights else {"weights_sha256": {}, "weights_sample": {}})}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(theirs: dict, ours: dict) -> list[str]:
    """``key old vs new`` for every (flattened, dotted) config key whose value differs."""
    a, b = _flatten(theirs), _flatten(ours)
    diffs = []
    for key in list(a) + [k for k in b if k not in a]:
        if key not in a or key not in b or a[key] != b[key]:
            old = json.dumps(a[key]) if key in a else "(missing)"
            new = json.dumps(b[key]) if key in b else "(missing)"
            diffs.append(f"{key} {old} vs {new}")
    return diffs


def _config_note(meta: dict, model: nn.Module) -> str:
    """``config differs from the base it was trained on (...)``, or "" when it does not."""
    fingerprint = meta["base_fingerprint"]
    ours = weight_config(model)
    if fingerprint.get("config_sha256") is None or ours is None or _config_sha256(ours) == fingerprint["config_sha256"]:
        return ""
    diffs = config_differences(meta["base_config"], ours) if meta.get("base_config") else ["config sha256"]
    if not diffs:
        return ""
    more = f", and {len(diffs) - SHOWN_CONFIG_DIFFS} more" if len(diffs) > SHOWN_CONFIG_DIFFS else ""
    return f"config differs from the base it was trained on ({', '.join(diffs[:SHOWN_CONFIG_DIFFS])}{more})"


def check_base(model: nn.Module, meta: dict, origin: str | None) -> None:
    """Compare the sidecar's base fingerprint with ``model``; ``AdapterError`` on a shape mismatch.

    Differences of config alone (no adapted shape changes) are logged as a warning.
    """
    fingerprint = meta.get("base_fingerprint")
    if not fingerprint:
        return
    made_for = f"a {fingerprint.get('model_class')} ({origin!r})"
    shapes = fingerprint.get("module_shapes") or {}
    modules = dict(model.named_modules())
    missing = [path for path in shapes if path not in modules]
    differ = [(path, shape, module_shape(modules[path])) for path, shape in shapes.items()
              if path in modules and module_shape(modules[path]) != shape]
    note = _config_note(meta, model)
    suffix = f"; {note}" if note else ""
    if shapes and len(missing) == len(shapes):
        raise AdapterError(f"this {type(model).__name__} has none of the {len(shapes)} modules the adapter targets "
                           f"(e.g. {missing[0]!r}); the adapter was made for {made_for}{suffix}")
    if differ:
        path, theirs, ours = differ[0]
        more = f" ({len(differ) - 1} more modules differ)" if len(differ) > 1 else ""
        raise AdapterError(f"adapter does not fit {path!r}: it was made for {made_for} whose {path} is {theirs}; "
                           f"this model's is {ours}{more}{suffix}")
    if missing:
        more = f" ({len(missing) - 1} more are missing)" if len(missing) > 1 else ""
        raise AdapterError(f"adapter targets module {missing[0]!r}, which this model does not have{more}; "
                           f"the adapter was made for {made_for}{suffix}")
    other_class = fingerprint.get("model_class") not in (None, type(model).__name__)
    weights = weights_mismatch(model, meta)
    if weights:
        log.warning("adapter made for %r: %s; loading it anyway", origin, weights)
    if note or other_class:
        what = note or f"it was made for a {fingerprint['model_class']}, this is a {type(model).__name__}"
        log.warning("adapter made for %r: %s; every adapted module has the shape it was trained on, "
                    "loading it anyway", origin, what)
