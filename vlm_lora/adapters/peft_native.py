"""PEFT's own formats for the variants that have one (VeRA: ``peft_type: VERA``; AdaLoRA:
``ADALORA``), beside the LoRA format of ``peft_format``.

Saving: when every adapted layer of an adapter uses one such variant (and the format can hold
it, e.g. one VeRA rank), ``to_native`` turns the LoRA-form config and tensors that
``save_adapter`` built into that format. Otherwise each of those layers is written as its exact
LoRA equivalent (VeRA: ``(d * A_s, b * B_s)``, scaling 1), so a recipe that gives the decoder
VeRA and the vision encoder LoRA still saves one adapter PEFT loads with equal logits.

Loading: ``native_to_lora`` turns a native adapter into the equivalent LoRA config and tensors,
which ``load_adapter`` then loads as usual (merge and eval need only the update, not the form).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from vlm_lora.lora import LoraLayer, iter_lora_layers

PREFIX = "base_model.model."
log = logging.getLogger("vlm_lora")
NATIVE_TYPES: dict[str, "NativeFormat"] = {}


class NativeFormat:
    """One PEFT format: ``fits`` (the adapter's layers can be written in it, else why not),
    ``write`` (config and tensors from the layers) and ``read`` (LoRA pairs from the file)."""

    peft_type = ""

    def fits(self, layers: dict[str, LoraLayer], name: str) -> str | None:
        return None

    def write(self, layers: dict[str, LoraLayer], name: str, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def read(self, modules: dict[str, nn.Module], config: dict,
             state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError


def register(format_: NativeFormat) -> NativeFormat:
    NATIVE_TYPES[format_.peft_type] = format_
    return format_


def _adapted_layers(model: nn.Module, name: str) -> dict[str, LoraLayer]:
    return {path: layer for path, layer in iter_lora_layers(model) if name in layer.specs}


def to_native(model: nn.Module, name: str, config: dict,
              tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config``/``tensors`` in the adapter's native PEFT format when it has one, else unchanged."""
    layers = _adapted_layers(model, name)
    kinds = {getattr(getattr(layer, "variants", {}).get(name), "peft_type", "LORA") for layer in layers.values()}
    if len(kinds) != 1 or kinds == {"LORA"}:
        if len(kinds) > 1:
            log.info("adapter mixes %s: each layer is saved as its exact LoRA equivalent", ", ".join(sorted(kinds)))
        return config, tensors
    format_ = NATIVE_TYPES[kinds.pop()]
    problem = format_.fits(layers, name)
    if problem:
        log.info("not saved as PEFT %s (%s): each layer is saved as its exact LoRA equivalent",
                 format_.peft_type, problem)
        return config, tensors
    kept = {k: v for k, v in tensors.items() if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))}
    native_config, native_tensors = format_.write(layers, name, config)
    native_tensors = {k: v.detach().contiguous().cpu() for k, v in native_tensors.items()}
    return native_config, {**kept, **native_tensors}


STATE_NAME = "vlm_lora_state.safetensors"  # trainable state of VeRA/AdaLoRA layers, for resuming (PEFT ignores it)


def training_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The trainable tensors of the adapter's layers whose variant has its own form (VeRA, AdaLoRA),
    under the model's parameter names, plus AdaLoRA's masks and importance averages: what a resumed run needs, which
    neither PEFT's format nor a LoRA equivalent holds (AdaLoRA's files are pruned)."""
    state = {}
    for path, layer in _adapted_layers(model, name).items():
        if not hasattr(getattr(layer, "variants", {}).get(name), "native_tensors"):
            continue
        for pname, param in layer.named_parameters():
            if name in pname.split(".") and not pname.startswith("base_layer."):
                state[f"{path}.{pname}"] = param.detach().contiguous().cpu()
        if name in getattr(layer, "adalora_mask", {}):
            state[f"{path}.adalora_mask.{name}"] = layer.adalora_mask[name].to("cpu", torch.uint8)
        for key, (avg, unc) in getattr(layer, "adalora_scores", {}).get(name, {}).items():  # importance averages
            state[f"{path}.adalora_scores.{name}.{key}.avg"] = avg.detach().contiguous().cpu()
            state[f"{path}.adalora_scores.{name}.{key}.unc"] = unc.detach().contiguous().cpu()
    return state


def restore_training_state(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Inverse of :func:`training_state`; returns the paths of the layers it filled."""
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for key, value in sorted(state.items()):  # avg before unc
            path, _, rest = key.partition(".adalora_mask.")
            if rest:
                layer = model.get_submodule(path)
                layer.adalora_mask[rest] = value.bool().to(layer.lora_E[rest].device)
                continue
            path, _, rest = key.partition(".adalora_scores.")
            if rest:  # NAME.KEY.avg|unc
                layer = model.get_submodule(path)
                name, score_key, which = rest.rsplit(".", 2)
                value = value.to(layer.lora_E[name].device)
                avg, unc = layer.adalora_scores.setdefault(name, {}).get(score_key, (None, None))
                layer.adalora_scores[name][score_key] = (value, unc) if which == "avg" else (avg, value)
                continue
            params[key].copy_(value)
            filled.add(next(p for p, _ in iter_lora_layers(model) if key.startswith(p + ".")))
    return filled


def native_to_lora(model: nn.Module, config: dict,
                   state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A native adapter's config and tensors as the equivalent LoRA ones."""
    modules = {path: (m.base_layer if isinstance(m, LoraLayer) else m) for path, m in model.named_modules()}
    return NATIVE_TYPES[config["peft_type"]].read(modules, config, state)


def use_dylora_rank(model: nn.Module, adapter_dir, meta: dict, rank: int, name: str) -> None:
    """After loading: the adapter's layers use their first ``rank`` components (DyLoRA only: the
    sidecar must say every layer was trained as DyLoRA, otherwise its ranks are not nested)."""
    from vlm_lora.adapters.fingerprint import AdapterError
    from vlm_lora.lora.dylora import set_rank

    if set(meta.get("variants", {})) != {"dylora"}:
        raise AdapterError(f"--rank {rank}: {adapter_dir} is not a DyLoRA adapter (variants "
                           f"{sorted(meta.get('variants', {})) or 'unknown'}); only DyLoRA ranks are nested")
    try:
        set_rank(model, rank, name, as_dylora=True)
    except ValueError as error:
        raise AdapterError(f"{adapter_dir}: {error}") from None


def lora_config(config: dict, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """A PEFT LoRA config over the targets of ``ranks`` (per-target rank and alpha as patterns)."""
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": config.get("base_model_name_or_path"),
            "r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
            "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
            "modules_to_save": config.get("modules_to_save"), "use_rslora": False, "use_dora": False}


def common_config(config: dict) -> dict:
    """The keys every PEFT format shares, taken from the LoRA config ``save_adapter`` built."""
    return {key: config.get(key) for key in ("task_type", "base_model_name_or_path", "target_modules",
                                              "modules_to_save", "bias", "fan_in_fan_out", "inference_mode")}


class VeraFormat(NativeFormat):
    """``base_model.vera_A`` [r, in_max], ``base_model.vera_B`` [out_max, r] (``save_projection``),
    and per layer ``<path>.vera_lambda_b`` [out], ``<path>.vera_lambda_d`` [r]."""

    peft_type = "VERA"

    def fits(self, layers, name):
        ranks = {layer.specs[name].rank for layer in layers.values()}
        dropouts = {layer.specs[name].dropout for layer in layers.values()}
        if len(ranks) > 1 or len(dropouts) > 1:
            return f"PEFT's VeRA takes one rank and dropout per adapter; this one has ranks {sorted(ranks)}"
        return None

    def write(self, layers, name, config):
        first = next(iter(layers.values()))
        shared = first.vera_projection[name]
        tensors = {"base_model.vera_A": shared.A, "base_model.vera_B": shared.B}
        for path, layer in layers.items():
            for key, tensor in layer.variants[name].native_tensors(layer, name).items():
                tensors[f"{PREFIX}{path}.{key}"] = tensor
        spec = first.specs[name]
        native = {**common_config(config), "peft_type": "VERA", "r": spec.rank, "vera_dropout": spec.dropout,
                  "projection_prng_key": shared.key, "save_projection": True, "d_initial": 0.1,
                  "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
        return native, tensors

    def read(self, modules, config, state):
        from vlm_lora.lora.vera import VeraProjection

        paths = [k[len(PREFIX):-len(".vera_lambda_b")] for k in state if k.endswith(".vera_lambda_b")]
        rank = config["r"]
        if "base_model.vera_A" in state:
            vera_a, vera_b = state["base_model.vera_A"], state["base_model.vera_B"]
        else:  # saved without the projection: draw it again from the recorded key, as PEFT does
            shapes = [(modules[p].in_features, modules[p].out_features) for p in paths if p in modules]
            shared = VeraProjection(rank, max(s[0] for s in shapes), max(s[1] for s in shapes),
                                    config.get("projection_prng_key", 0))
            vera_a, vera_b = shared.A, shared.B
        out = {k: v for k, v in state.items() if ".vera_lambda_" not in k and not k.startswith("base_model.vera_")}
        for path in paths:
            module = modules.get(path)
            in_f = module.in_features if module is not None else vera_a.shape[1]
            lambda_b, lambda_d = state[f"{PREFIX}{path}.vera_lambda_b"], state[f"{PREFIX}{path}.vera_lambda_d"]
            out[f"{PREFIX}{path}.lora_A.weight"] = lambda_d.float()[:, None] * vera_a[:rank, :in_f].float()
            out[f"{PREFIX}{path}.lora_B.weight"] = lambda_b.float()[:, None] * vera_b[:lambda_b.shape[0], :rank].float()
        return lora_config(config, dict.fromkeys(paths, rank), dict.fromkeys(paths, float(rank))), out


register(VeraFormat())


class AdaLoraFormat(NativeFormat):
    """Per layer ``<path>.lora_A`` [k, in], ``.lora_B`` [out, k], ``.lora_E`` [k, 1] (the k kept
    triplets), and ``rank_pattern`` ``{"<path>.lora_E": [kept?] * init_r}``; PEFT's scaling is
    ``lora_alpha / (init_r + 1e-5)``."""

    peft_type = "ADALORA"

    def fits(self, layers, name):
        from vlm_lora.lora.adalora import options

        settings = {(layer.specs[name].rank, layer.specs[name].alpha, layer.specs[name].dropout,
                     tuple(sorted(options(layer, name).items()))) for layer in layers.values()}
        return None if len(settings) == 1 else "PEFT's AdaLoRA takes one init_r, alpha and budget per adapter"

    def write(self, layers, name, config):
        from vlm_lora.lora.adalora import options

        first = next(iter(layers.values()))
        spec, opts = first.specs[name], options(first, name)
        tensors, pattern = {}, {}
        for path, layer in layers.items():
            for key, tensor in layer.variants[name].native_tensors(layer, name).items():
                tensors[f"{PREFIX}{path}.{key}"] = tensor
            pattern[f"{path}.lora_E"] = layer.adalora_mask[name].tolist()
        total = max(getattr(first, "adalora_total_steps", 0), opts["tinit"] + opts["tfinal"] + 1)
        native = {**common_config(config), "peft_type": "ADALORA", "init_r": spec.rank, "target_r": opts["target_r"],
                  "tinit": opts["tinit"], "tfinal": opts["tfinal"], "deltaT": opts["delta_t"], "beta1": opts["beta1"],
                  "beta2": opts["beta2"], "orth_reg_weight": opts["orth_reg_weight"], "total_step": total,
                  "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "rank_pattern": pattern,
                  "use_rslora": False, "use_dora": False, "init_lora_weights": True}
        return native, tensors

    def read(self, modules, config, state):
        scale = config["lora_alpha"] / (config["init_r"] + 1e-5)
        out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B", ".lora_E"))}
        ranks = {}
        for key in state:
            if not key.endswith(".lora_E") or state[key].shape[0] == 0:
                continue  # a module pruned to rank 0 adds nothing
            path = key[len(PREFIX):-len(".lora_E")]
            lora_e = state[key].float()
            out[f"{PREFIX}{path}.lora_A.weight"] = state[f"{PREFIX}{path}.lora_A"].float() * lora_e
            out[f"{PREFIX}{path}.lora_B.weight"] = state[f"{PREFIX}{path}.lora_B"].float() * scale
            ranks[path] = lora_e.shape[0]
        return lora_config(config, ranks, {p: float(r) for p, r in ranks.items()}), out


register(AdaLoraFormat())
