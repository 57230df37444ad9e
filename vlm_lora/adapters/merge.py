"""Merge adapters into their base: one adapter folded in exactly (``merge_adapter``), or several
combined by adapter arithmetic (``merge_adapters``: linear, cat, svd, TIES, DARE, magnitude
pruning, SLERP on the dense deltas) and written as a PEFT adapter or a merged model."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm_lora.adapters.arithmetic import LINEAR_METHODS, cat_factors, merge_deltas, qr_svd_factors, svd_factors
from vlm_lora.adapters.folder import write_complete_folder
from vlm_lora.adapters.loftq_report import rebuild_loftq_base
from vlm_lora.adapters.peft_native import native_to_lora
from vlm_lora.adapters.peft_format import (CONFIG_NAME, META_NAME, PREFIX, WEIGHTS_NAME, AdapterError, _pattern_value,
                                           base_fingerprint, check_base, load_adapter, lora_pairs, read_adapter_config,
                                           read_meta, weight_config)
from vlm_lora.adapters.base_weights import weights_mismatch
from vlm_lora.adapters.merge_options import check_merge_request
from vlm_lora.lora import LoraLayer, iter_lora_layers, unload_lora
from vlm_lora.lora.mha import OUT_SUFFIX
from vlm_lora.lora.variants import lora_scaling
from vlm_lora.modeling import load_model_and_processor


log = logging.getLogger("vlm_lora")


PROBE_SIZE = 256  # px; each processor resizes, tiles or splits it as it does its training images


def probe_batch(processor) -> dict:
    """A fixed input built by the model's own processor: a 256 px grey-level ramp image and the chat
    prompt "Describe the image." (input_ids [1, T], pixel_values and the family's other tensors)."""
    from PIL import Image

    from vlm_lora.data.processors import build_prompt

    image = Image.linear_gradient("L").resize((PROBE_SIZE, PROBE_SIZE)).convert("RGB")
    return dict(processor(images=[image], text=[build_prompt(processor, "Describe the image.")], return_tensors="pt"))


@torch.no_grad()
def _probe_logits(model, processor) -> torch.Tensor:
    """Logits [1, T, V] on ``probe_batch``, to check the merge reproduces the adapter."""
    batch = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
             for k, v in probe_batch(processor).items() if isinstance(v, torch.Tensor)}
    return model(**batch).logits.float()


def _quantize_like_training(model, quant: dict, modules_to_save: list[str]) -> None:
    """Put the components an adapter was trained on in 4-bit into 4-bit, as in training."""
    from vlm_lora.quantize import quantize_linears
    from vlm_lora.architectures.registry import detect_architecture

    components = detect_architecture(model).components
    prefixes = [p for c in quant["components"] if c in components for p in components[c].prefixes]
    quantize_linears(model, prefixes, quant["type"], quant["double_quant"], "float32")
    for prefix in modules_to_save:  # fully-trained modules were never quantized
        if any(prefix == p or prefix.startswith(p + ".") or p.startswith(prefix + ".") for p in prefixes):
            log.warning("%s was trained in full but lies in a quantized component", prefix)


def unshare_replicated(model) -> None:
    if getattr(model, "layer_replication", None):
        from vlm_lora.architectures.registry import detect_architecture
        from vlm_lora.architectures.replication import decoder_layers_path, unshare_layers

        prefixes = detect_architecture(model).components["language_decoder"].prefixes
        log.info("unshared %d replicated tensors", unshare_layers(model, decoder_layers_path(model, prefixes)))


def refuse_other_weights(model: nn.Module, adapter_dirs: list, metas: list[dict], force: bool) -> None:
    """AdapterError when an adapter's base weight hashes say ``model`` is another checkpoint than the one
    it was trained on (unless ``force``: then loading it only warns)."""
    for adapter_dir, meta in zip(adapter_dirs, metas):
        mismatch = weights_mismatch(model, meta)
        if mismatch and not force:
            raise AdapterError(f"adapter {str(adapter_dir)!r}: {mismatch} Merging would fold it into a base it was "
                               f"not trained on; pass --force (force=True) to merge anyway")


def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                  force: bool = False, rank: int | None = None) -> dict:
    """Load ``base``, apply ``adapter_dir``, merge in fp32 and save a plain model to ``out_dir``.
    ``rank``: a DyLoRA adapter's first ``rank`` components only.

    Refuses a base whose weights differ from those the adapter was trained on, unless ``force``.
    Returns ``{"max_logit_diff": float}``: adapter model vs merged model on a probe input.
    """
    check_merge_request(base, [adapter_dir], out_dir)
    model, processor = load_model_and_processor(base, "float32")
    meta = read_meta(adapter_dir)
    quant = meta.get("quantization")
    if quant:  # trained on a 4-bit base: merge into the same dequantized weights it saw
        rebuild_loftq_base(model, meta)  # init loftq: the base was the LoftQ residual
        _quantize_like_training(model, quant, read_adapter_config(adapter_dir).get("modules_to_save") or [])
    refuse_other_weights(model, [adapter_dir], [meta], force)
    load_adapter(model, adapter_dir, rank=rank)
    unshare_replicated(model)  # replicated decoder layers: each copy gets its own merged weights
    layers = len(list(iter_lora_layers(model)))
    before = _probe_logits(model, processor)
    if quant:
        from vlm_lora.quantize import dequantize_linears

        log.info("dequantized %d 4-bit linears to float32 before merging", dequantize_linears(model))
    unload_lora(model, merge=True)
    after = _probe_logits(model, processor)
    diff = (before - after).abs().max().item()
    log.info("merged %d LoRA layers; max |logit difference| adapter vs merged: %.3g", layers, diff)
    from vlm_lora.modeling import DTYPES

    model = model.to(DTYPES[dtype])
    apply_trained_pixels(processor, adapter_dir)
    write_complete_folder(model, processor, base, Path(out_dir))
    return {"merged_layers": layers, "max_logit_diff": diff}


def apply_trained_pixels(processor, adapter_dir: str | Path) -> None:
    """Put the pixel budget the adapter was trained with (``vlm_lora.json`` ``processor``) on ``processor``,
    so that an exported folder resizes images as training did."""
    pixels = read_meta(adapter_dir).get("processor") or {}
    if pixels.get("min_pixels") or pixels.get("max_pixels"):
        from vlm_lora.data.pixels import set_processor_pixels

        set_processor_pixels(processor, pixels.get("min_pixels"), pixels.get("max_pixels"))
    if pixels.get("video"):  # data.video: frame sampling and pixels per frame (vlm_lora.data.video)
        from vlm_lora.data.video import set_video_options

        set_video_options(processor, **pixels["video"])


# ---------------------------------------------------------------- several adapters: arithmetic

@dataclass
class DeltaPart:
    """One adapter's update of one base tensor: LoRA ``factors`` (s B [out, r], A [r, in]) or ``dense``.

    full: a fully-trained tensor (``modules_to_save``), written back as a plain tensor;
    target: the PEFT target path of a LoRA update; rank: its rank.
    """

    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None
    full: bool = False
    target: str | None = None
    rank: int = 0

    def to_dense(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.factors[0] @ self.factors[1]


def _param_of_target(modules: dict[str, nn.Module], target: str) -> str:
    """The base parameter a PEFT target updates: ``<path>.weight``, an MHA's ``in_proj_weight`` or its out_proj."""
    if target.endswith("." + OUT_SUFFIX):
        return target[:-len(OUT_SUFFIX)] + "out_proj.weight"
    module = modules.get(target)
    module = module.base_layer if isinstance(module, LoraLayer) else module
    if isinstance(module, nn.MultiheadAttention):
        return f"{target}.in_proj_weight"
    if isinstance(module, nn.Linear):
        return f"{target}.weight"
    raise AdapterError(f"adapter targets {target!r}, which is not a linear of this {type(module).__name__ if module else 'model'}")


def adapter_deltas(model: nn.Module, adapter_dir: str | Path) -> dict[str, DeltaPart]:
    """Base parameter name -> this adapter's update of it (fp32), read from the PEFT files.

    LoRA: ``(s B, A)`` with PEFT's scaling (rsLoRA included); DoRA: the dense
    ``m (W + s B A) / ||W + s B A||_row - W``; fully-trained tensors: ``W_i - W_base``.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    if config["peft_type"] != "LORA":  # VeRA, AdaLoRA: their exact LoRA equivalent
        config, state = native_to_lora(model, config, state)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    parts: dict[str, DeltaPart] = {}
    for target, (lora_a, lora_b, magnitude) in lora_pairs(state).items():
        rank = lora_a.shape[0]
        alpha = _pattern_value(target, config.get("alpha_pattern") or {}, config["lora_alpha"])
        scaled_b = lora_b.float() * lora_scaling(rank, alpha, bool(config.get("use_rslora")))
        name = _param_of_target(modules, target)
        if magnitude is None:
            parts[name] = DeltaPart(factors=(scaled_b, lora_a.float()), target=target, rank=rank)
            continue
        weight = params[name].detach().float()
        combined = weight + scaled_b @ lora_a.float()
        dense = combined * (magnitude.float() / combined.norm(dim=1))[:, None] - weight
        parts[name] = DeltaPart(dense=dense, target=target, rank=rank)
    for key, tensor in state.items():
        if ".lora_A." in key or ".lora_B." in key or key.endswith(".lora_magnitude_vector"):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name not in params or params[name].shape != tensor.shape:
            raise AdapterError(f"{adapter_dir}: tensor {key!r} has no place of shape {tuple(tensor.shape)} in the base")
        parts[name] = DeltaPart(dense=tensor.float() - params[name].detach().float(), full=True)
    return parts


def _check_same_base(adapter_dirs: list[Path], metas: list[dict]) -> None:
    """AdapterError when two adapters' base fingerprints (model class, config hash) differ."""
    seen = None
    for adapter_dir, meta in zip(adapter_dirs, metas):
        fingerprint = meta.get("base_fingerprint") or {}
        key = (fingerprint.get("model_class"), fingerprint.get("config_sha256"))
        if key == (None, None):
            continue
        if seen is not None and key != seen[1]:
            raise AdapterError(f"adapters {str(seen[0])!r} and {str(adapter_dir)!r} were trained on different bases "
                               f"({seen[1][0]} config {str(seen[1][1])[:12]} vs {key[0]} config {str(key[1])[:12]}); "
                               f"only adapters of one base can be merged")
        seen = seen or (adapter_dir, key)


def _check_quantization(model, adapter_dirs: list[Path], metas: list[dict], allow_mixed: bool) -> dict | None:
    """Prepare the base the deltas apply to: with all adapters trained on the same 4-bit base, its
    dequantized weights; 4-bit mixed with 16-bit only if ``allow_mixed`` (then the 16-bit base)."""
    quants = [meta.get("quantization") for meta in metas]
    if not any(quants):
        return None
    if all(quants) and len({json.dumps(q, sort_keys=True) for q in quants}) == 1:
        from vlm_lora.quantize import dequantize_linears

        saved = sorted({p for d in adapter_dirs for p in read_adapter_config(d).get("modules_to_save") or []})
        _quantize_like_training(model, quants[0], saved)
        log.info("merging into the dequantized 4-bit base (%d linears)", dequantize_linears(model))
        return quants[0]
    if not allow_mixed:
        four_bit = [str(d) for d, q in zip(adapter_dirs, quants) if q]
        raise AdapterError(f"adapters {four_bit} were trained on a 4-bit base and the others on a 16-bit one; their "
                           f"deltas assume different base weights. Pass --allow-mixed-quantization to merge them "
                           f"into the 16-bit base anyway")
    log.warning("merging 4-bit-trained and 16-bit-trained adapters into the 16-bit base (asked for)")
    return None


def merge_parts(parts: list[dict[str, DeltaPart]], weights: list[float], method: str, density: float = 1.0,
                t: float = 0.5, rank: int | None = None, seed: int = 0, as_adapter: bool = True,
                shapes: dict[str, torch.Size] | None = None) -> tuple[dict[str, DeltaPart], dict[str, float]]:
    """Merge per-adapter updates tensor by tensor; returns (merged parts, relative truncation error per tensor).

    As an adapter: ``cat`` of LoRA factors is exact; other linear methods on LoRA factors re-factor by
    QR + small SVD; everything else goes dense and is re-factored by SVD to ``rank`` (default: the
    largest input rank of that tensor; ``cat`` on dense parts: the sum). Fully-trained tensors and
    ``as_adapter=False`` stay dense and exact. DARE masks come from one generator seeded by ``seed``,
    drawn tensor by tensor in name order, adapter by adapter.
    """
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, DeltaPart] = {}
    errors: dict[str, float] = {}
    for name in sorted(set().union(*parts)):
        present = [(w, p[name]) for w, p in zip(weights, parts) if name in p]
        full = any(part.full for _, part in present)
        target = next((part.target for _, part in present if part.target), None)
        ranks = [part.rank for _, part in present if part.rank]
        if as_adapter and method in LINEAR_METHODS and all(part.factors is not None for _, part in present):
            factors, ws = [part.factors for _, part in present], [w for w, _ in present]
            if method == "cat":
                b, a = cat_factors(factors, ws)
            else:
                b, a, errors[name] = qr_svd_factors(factors, ws, rank or max(ranks))
            merged[name] = DeltaPart(factors=(b, a), target=target, rank=b.shape[1])
            continue
        shape = present[0][1].to_dense().shape if shapes is None else shapes[name]
        deltas = [p[name].to_dense() if name in p else torch.zeros(shape) for p in parts]
        dense = merge_deltas(deltas, weights, method, density, t, generator)
        if as_adapter and not full:
            k = rank or (sum(ranks) if method == "cat" else max(ranks))
            b, a, errors[name] = svd_factors(dense, k)
            merged[name] = DeltaPart(factors=(b, a), target=target, rank=b.shape[1])
        else:
            merged[name] = DeltaPart(dense=dense, full=full, target=target)
    return merged, errors


def _write_merged_adapter(model, merged: dict[str, DeltaPart], adapter_dirs: list[Path], base: str,
                          out_dir: Path, extra_meta: dict) -> None:
    """PEFT files for merged parts: rank-k pairs with alpha = k (scaling 1), full tensors as W_base + delta."""
    params = dict(model.named_parameters())
    tensors, ranks = {}, {}
    for name, part in merged.items():
        if part.factors is None:
            tensors[PREFIX + name] = (params[name].detach().float() + part.dense).contiguous()
            continue
        if part.target.endswith(OUT_SUFFIX) or name.endswith("in_proj_weight"):
            raise AdapterError(f"{part.target}: a merged nn.MultiheadAttention adapter cannot be written in PEFT "
                               f"format yet; use --as model")
        b, a = part.factors
        tensors[f"{PREFIX}{part.target}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{part.target}.lora_B.weight"] = b.contiguous()
        ranks[part.target] = b.shape[1]
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    saved = sorted({p for d in adapter_dirs for p in read_adapter_config(d).get("modules_to_save") or []})
    pattern = {p: v for p, v in sorted(ranks.items()) if v != r}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": r, "lora_alpha": r,
              "lora_dropout": 0.0, "target_modules": sorted(ranks), "rank_pattern": pattern, "alpha_pattern": pattern,
              "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    base_config = weight_config(model)
    fingerprint = base_fingerprint(model, sorted(ranks), base_config,  # a dequantized 4-bit base: no hashes
                                   hash_weights="quantization" not in extra_meta)
    meta = {"sliced_layers": {}, **extra_meta, "base_fingerprint": fingerprint, "base_config": base_config}
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})


LOSSY_WARNING = 0.01  # relative truncation error above which --as adapter warns


def _report_truncation(method: str, errors: dict[str, float], merged: dict[str, DeltaPart]) -> None:
    """Log how far the written adapter is from the merged deltas: a WARNING above 1% relative error (or
    whenever ``cat`` could not be exact), INFO otherwise."""
    worst_name = max(errors, key=errors.get)
    worst, mean = errors[worst_name], sum(errors.values()) / len(errors)
    where = f"worst {merged[worst_name].target or worst_name} at rank {merged[worst_name].rank}"
    if method == "cat":  # cat only re-factors tensors with a dense (DoRA) input, which is not low-rank
        log.warning("cat is exact for plain LoRA inputs, but %d tensors have a DoRA input (a dense update, not "
                    "low-rank) and were re-factored by SVD: relative truncation error max %.3g (%s), mean %.3g; "
                    "--as model writes the exact merge", len(errors), worst, where, mean)
    elif worst > LOSSY_WARNING:
        log.warning("%s --as adapter is lossy: re-factoring %d merged tensors to LoRA pairs drops a relative "
                    "truncation error of max %.3g (%s), mean %.3g; a larger --rank keeps more, --as model is "
                    "exact", method, len(errors), worst, where, mean)
    else:
        log.info("%s: re-factored %d tensors; relative truncation error max %.3g, mean %.3g", method, len(errors),
                 worst, mean)


def merge_adapters(base: str, adapter_dirs: list[str | Path], out_dir: str | Path, method: str,
                   weights: list[float] | None = None, density: float | None = None, t: float | None = None,
                   rank: int | None = None, seed: int | None = None, output: str | None = None,
                   dtype: str | None = None, allow_mixed_quantization: bool = False, force: bool = False) -> dict:
    """Merge several adapters of one base by ``method`` (see :mod:`vlm_lora.adapters.arithmetic`) and
    write a PEFT adapter (``output="adapter"``, the default) or the merged model (``"model"``, exact).

    Options left None take their defaults (density 1, t 0.5, seed 0, rank: the largest input rank,
    dtype float32); one the method does not read is an error (:mod:`vlm_lora.adapters.merge_options`).
    Returns ``{"method", "tensors", "max_relative_truncation_error", ...}``.
    """
    check_merge_request(base, adapter_dirs, out_dir, method, weights, density, t, rank, seed, output, dtype)
    adapter_dirs = [Path(d) for d in adapter_dirs]
    weights = list(weights) if weights is not None else [1.0] * len(adapter_dirs)
    density, t, seed = 1.0 if density is None else density, 0.5 if t is None else t, seed or 0
    output, dtype = output or "adapter", dtype or "float32"
    metas = [read_meta(d) for d in adapter_dirs]
    _check_same_base(adapter_dirs, metas)
    model, processor = load_model_and_processor(base, "float32")
    for adapter_dir, meta in zip(adapter_dirs, metas):
        check_base(model, meta, str(adapter_dir))
    quant = _check_quantization(model, adapter_dirs, metas, allow_mixed_quantization)
    refuse_other_weights(model, adapter_dirs, metas, force)
    parts = [adapter_deltas(model, d) for d in adapter_dirs]
    params = dict(model.named_parameters())
    merged, errors = merge_parts(parts, weights, method, density, t, rank, seed, output == "adapter",
                                 {name: params[name].shape for p in parts for name in p})
    worst = max(errors.values(), default=0.0)
    if errors:
        _report_truncation(method, errors, merged)
    out_dir = Path(out_dir)
    settings = {"method": method, "adapters": [str(d) for d in adapter_dirs], "weights": weights, "density": density,
                "t": t, "rank": rank, "seed": seed}
    if output == "adapter":
        _write_merged_adapter(model, merged, adapter_dirs, base, out_dir,
                              {"merge": settings, **({"quantization": quant} if quant else {})})
    else:
        with torch.no_grad():
            for name, part in merged.items():
                params[name].add_(part.to_dense().to(params[name].dtype))
        from vlm_lora.modeling import DTYPES

        write_complete_folder(model.to(DTYPES[dtype]), processor, base, out_dir)
    return {**settings, "as": output, "tensors": len(merged), "max_relative_truncation_error": worst}
