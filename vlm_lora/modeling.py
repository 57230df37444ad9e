"""Load a base model and its processor: transformers folders or hub ids, timm folders.

A loader is chosen by what the folder holds (data, not guesses): a transformers
``config.json`` has ``model_type``; a timm one has ``architecture``; an open_clip folder has
``open_clip_config.json``. ``timm:<name>`` loads a timm model by name (hub weights when online,
random init with ``timm:<name>?random``); ``open_clip:<name>`` an open_clip model by name or
``hf-hub:`` id (``open_clip:<name>?random``: no pretrained weights).
A transformers path is resolved first (:func:`resolve_config`), so that a path that names nothing
fails in seconds with one line saying what to do, not after a minute of download retries.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_CONNECT_TIMEOUT_S = 3.0
log = logging.getLogger("vlm_lora")


class ModelPathError(ValueError):
    """A model path that is neither a local model folder nor a hub model that can be reached."""


class ClipProcessor:
    """An open_clip model's "processor": ``preprocess`` (PIL image -> [3, H, W]) and ``tokenizer``
    (list of texts -> [N, context_length] token ids)."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer


def model_source(path: str) -> str:
    """'timm', 'open_clip' or 'transformers' for a model path."""
    if path.startswith("timm:"):
        return "timm"
    if path.startswith("open_clip:") or (Path(path) / "open_clip_config.json").is_file():
        return "open_clip"
    config = Path(path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if "architecture" in data and "model_type" not in data:
            return "timm"
    return "transformers"


def resolve_config(path: str, trust_remote_code: bool = False):
    """The transformers config of ``path``: a local folder with ``config.json``, else a hub id from the
    local cache, else from the hub after a short reachability check. Raises ``ModelPathError``."""
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelPathError(f"model path {path}: the folder has no config.json; point it at a folder written "
                                 f"by save_pretrained (or at a hub id)")
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if folder.exists() or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ModelPathError(f"model path {path}: no such folder; give a local model folder or a hub id (org/name)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the local hub cache
    advice = f"download it where the hub is reachable (hf download {path}) and set model.path to that folder"
    if _offline():
        raise ModelPathError(f"model path {path}: not a local folder and not in the hub cache (HF_HUB_OFFLINE is "
                             f"set); {advice}")
    advice += ", or set HF_HUB_OFFLINE=1 to use the local hub cache only"
    endpoint = _hub_endpoint()
    if not _reachable(endpoint):
        raise ModelPathError(f"model path {path}: not a local folder, not in the hub cache, and {endpoint} cannot be "
                             f"reached; {advice}")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelPathError(f"model path {path}: not found on {endpoint} ({reason}); check the id (org/name) or "
                             f"give a local model folder") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable(endpoint: str) -> bool:
    """One TCP connection to the hub's host within ``HUB_CONNECT_TIMEOUT_S``."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _looks_like_hub_id(path: str) -> bool:
    """org/name, not a local path."""
    return path.count("/") == 1 and not path.startswith(("/", ".", "~")) and not Path(path).exists()


def model_on_meta(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model at ``path`` built from its config alone on the meta device: no weights, any size, seconds.
    Hub ids of ``PUBLISHED_CONFIGS`` that cannot be resolved are built from that table (with a warning)."""
    from transformers import AutoModelForImageTextToText

    from vlm_lora.architectures.published_configs import published_config

    try:
        config = resolve_config(path, trust_remote_code)
    except ModelPathError as error:
        config = published_config(path)
        if config is None and _looks_like_hub_id(path):
            raise ModelPathError(f"{error}; for plan --meta a folder holding just its config.json is enough "
                                 f"(hf download {path} config.json --local-dir DIR)") from None
        if config is None:
            raise
        log.warning("%s; planning from vlm-lora's table of its published hyperparameters instead", error)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def load_model_and_processor(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                             num_classes: int | None = None, trust_remote_code: bool = False,
                             allow_pickle: bool = False):
    """Returns (model, processor) in eval mode on ``device``.

    transformers weights load from safetensors only, unless ``allow_pickle`` (pickle ``.bin`` files can
    run code when loaded; ``model.allow_pickle: true`` for a trusted model shipped without safetensors).

    transformers: ``AutoModelForImageTextToText`` + ``AutoProcessor``. timm: the model (with a
    fresh ``num_classes`` head when given) and its data config dict as the "processor".
    """
    if model_source(path) == "timm":
        return _load_timm(path, dtype, device, num_classes)
    if model_source(path) == "open_clip":
        return _load_open_clip(path, dtype, device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    resolve_config(path, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                            use_safetensors=None if allow_pickle else True)
    except OSError as error:
        if allow_pickle or "safetensors" not in str(error):
            raise
        raise ModelPathError(f"model path {path}: no safetensors weights; vlm-lora loads only safetensors unless "
                             f"model.allow_pickle: true (pickle .bin files can run code: only for a trusted model)") from None
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def _load_open_clip(path: str, dtype: str, device):
    import open_clip

    if path.startswith("open_clip:"):
        name, _, option = path[len("open_clip:"):].partition("?")
        pretrained = None if option == "random" else (open_clip.list_pretrained_tags_by_model(name) or [None])[0]
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    else:
        name = f"local-dir:{path}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    processor = ClipProcessor(preprocess, open_clip.get_tokenizer(name))
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), processor


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
