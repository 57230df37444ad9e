"""Load a base model and its processor: transformers folders or hub ids, timm folders.

A loader is chosen by what the folder holds (data, not guesses): a transformers
``config.json`` has ``model_type``; a timm one has ``architecture``. ``timm:<name>`` loads a
timm model by name (hub weights when online, random init with ``timm:<name>?random``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(path: str) -> str:
    """'timm' or 'transformers' for a model path."""
    if path.startswith("timm:"):
        return "timm"
    config = Path(path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if "architecture" in data and "model_type" not in data:
            return "timm"
    return "transformers"


def load_model_and_processor(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                             num_classes: int | None = None, trust_remote_code: bool = False):
    """Returns (model, processor) in eval mode on ``device``.

    transformers: ``AutoModelForImageTextToText`` + ``AutoProcessor``. timm: the model (with a
    fresh ``num_classes`` head when given) and its data config dict as the "processor".
    """
    if model_source(path) == "timm":
        return _load_timm(path, dtype, device, num_classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def _load_timm(path: str, dtype: str, device, num_classes: int | None):
    import timm

    if path.startswith("timm:"):
        name, _, option = path[len("timm:"):].partition("?")
        kwargs = {"pretrained": option != "random"}
    else:
        name, kwargs = f"local-dir:{path}", {"pretrained": True}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, **kwargs)
    data_config = timm.data.resolve_data_config({}, model=model)
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), data_config
