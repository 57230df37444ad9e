"""Load a base model and its processor (local folder or hub id)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_processor(path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Returns (model, processor); the model in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor
