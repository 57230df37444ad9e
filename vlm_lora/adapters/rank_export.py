"""``vlm-lora export --rank K``: a DyLoRA adapter cut to its first K components, written as a
plain PEFT LoRA of rank K (alpha as trained, so the scaling is alpha / K as in training)."""

from __future__ import annotations

from pathlib import Path

from vlm_lora.adapters.peft_format import load_adapter, read_adapter_config, save_adapter
from vlm_lora.modeling import load_model_and_processor


def export_at_rank(base: str, adapter_dir: str | Path, out_dir: str | Path, rank: int) -> dict:
    """Load ``base`` with the DyLoRA adapter at ``rank`` and save that adapter to ``out_dir``."""
    config = read_adapter_config(adapter_dir)
    model, _ = load_model_and_processor(base, "float32")
    paths = load_adapter(model, adapter_dir, rank=rank)
    save_adapter(model, out_dir, config.get("base_model_name_or_path") or base, config.get("modules_to_save") or [])
    return {"rank": rank, "layers": len(paths), "out": str(out_dir)}
