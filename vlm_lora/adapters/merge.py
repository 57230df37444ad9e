"""Merge an adapter into its base and export a plain transformers model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlm_lora.adapters.peft_format import load_adapter, read_adapter_config, read_meta
from vlm_lora.lora import iter_lora_layers, unload_lora
from vlm_lora.modeling import load_model_and_processor

log = logging.getLogger("vlm_lora")


PROBE_SIZE = 256  # px; each processor resizes, tiles or splits it as it does its training images


def probe_batch(processor) -> dict:
    """A fixed input built by the model's own processor: a 256 px grey-level ramp image and the chat
    prompt "Describe the image." (input_ids [1, T], pixel_values and the family's other tensors)."""
    from PIL import Image

    from vlm_lora.data.collate import build_prompt

    image = Image.linear_gradient("L").resize((PROBE_SIZE, PROBE_SIZE)).convert("RGB")
    return dict(processor(images=[image], text=[build_prompt(processor, "Describe the image.")], return_tensors="pt"))


@torch.no_grad()
def _probe_logits(model, processor) -> torch.Tensor:
    """Logits [1, T, V] on ``probe_batch``, to check the merge reproduces the adapter."""
    batch = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
             for k, v in probe_batch(processor).items() if isinstance(v, torch.Tensor)}
    return model(**batch).logits.float()


def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """Load ``base``, apply ``adapter_dir``, merge in fp32 and save a plain model to ``out_dir``.

    Returns ``{"max_logit_diff": float}``: adapter model vs merged model on a probe input.
    """
    model, processor = load_model_and_processor(base, "float32")
    quant = read_meta(adapter_dir).get("quantization")
    if quant:  # trained on a 4-bit base: merge into the same dequantized weights it saw
        from vlm_lora.quantize import quantize_linears
        from vlm_lora.architectures.registry import detect_architecture

        components = detect_architecture(model).components
        prefixes = [p for c in quant["components"] if c in components for p in components[c].prefixes]
        quantize_linears(model, prefixes, quant["type"], quant["double_quant"], "float32")
        modules_to_save = read_adapter_config(adapter_dir).get("modules_to_save") or []
        for prefix in modules_to_save:  # fully-trained modules were never quantized
            if any(prefix == p or prefix.startswith(p + ".") or p.startswith(prefix + ".") for p in prefixes):
                log.warning("%s was trained in full but lies in a quantized component", prefix)
    load_adapter(model, adapter_dir)
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
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"merged_layers": layers, "max_logit_diff": diff}
