"""Merge an adapter into its base and export a plain transformers model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlm_lora.adapter_io import load_adapter
from vlm_lora.lora import iter_lora_layers, unload_lora
from vlm_lora.modeling import load_model_and_processor

log = logging.getLogger("vlm_lora")


@torch.no_grad()
def _probe_logits(model, processor) -> torch.Tensor:
    """Logits [1, T, V] on a fixed grey image and prompt, to check the merge reproduces the adapter."""
    from PIL import Image

    from vlm_lora.data import build_prompt

    size = processor.image_processor.crop_size if hasattr(processor.image_processor, "crop_size") else None
    side = (size or {}).get("height", 224) if isinstance(size, dict) else 224
    image = Image.new("RGB", (side, side), (128, 96, 160))
    batch = processor(images=[image], text=[build_prompt(processor, "Describe the image.")], return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return model(**batch).logits.float()


def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """Load ``base``, apply ``adapter_dir``, merge in fp32 and save a plain model to ``out_dir``.

    Returns ``{"max_logit_diff": float}``: adapter model vs merged model on a probe input.
    """
    model, processor = load_model_and_processor(base, "float32")
    load_adapter(model, adapter_dir)
    layers = len(list(iter_lora_layers(model)))
    before = _probe_logits(model, processor)
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
