"""Complete model folders: what ``merge`` and ``export`` write so that plain transformers, vLLM and SGLang
load the folder on its own (merged Qwen2-VL folders without processor or tokenizer files are a common
field report).

``write_complete_folder`` saves the model (``config.json`` with ``architectures`` = the model's class,
``generation_config.json``, weights) and its processor (tokenizer, chat template, image- and video-processor
settings: resolution, pixel budgets), copies the base folder's other small files that the processor does not
write (``tokenizer.model``, ``special_tokens_map.json``, ...), and also writes the image / video processor
settings as the flat ``preprocessor_config.json`` / ``video_preprocessor_config.json`` that readers older
than transformers 5 (which nests them in ``processor_config.json``) look for. ``missing_parts`` lists
what a folder lacks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch import nn

log = logging.getLogger("vlm_lora")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
AUX_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")
NEVER_COPIED = {"config.json", "adapter_config.json", "vlm_lora.json"}
MAX_AUX_BYTES = 64 * 2 ** 20
FLAT_PROCESSOR_FILES = {"image_processor": "preprocessor_config.json",
                        "video_processor": "video_preprocessor_config.json"}


def base_folder(base: str) -> Path | None:
    """The local folder of ``base``: itself, or its snapshot in the hub cache; None when there is none."""
    if Path(base).is_dir():
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True, allow_patterns=[f"*{s}" for s in AUX_SUFFIXES]))
    except Exception:  # noqa: BLE001 - not a hub id, or not cached: nothing to copy
        return None


def _copy_aux_files(source: Path, out_dir: Path) -> list[str]:
    """Copy the small non-weight files of ``source`` that ``out_dir`` does not have yet."""
    copied = []
    for path in sorted(source.iterdir()):
        if (path.is_file() and path.name not in NEVER_COPIED and path.name.endswith(AUX_SUFFIXES)
                and not path.name.endswith(WEIGHT_SUFFIXES) and not (out_dir / path.name).exists()
                and path.stat().st_size <= MAX_AUX_BYTES):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def _write_flat_processor_files(processor, out_dir: Path) -> list[str]:
    """``preprocessor_config.json`` / ``video_preprocessor_config.json`` for pre-transformers-5 readers."""
    written = []
    for attribute, name in FLAT_PROCESSOR_FILES.items():
        part = getattr(processor, attribute, None)
        if part is None or not hasattr(part, "to_dict") or (out_dir / name).exists():
            continue
        settings = {**part.to_dict(), "processor_class": type(processor).__name__}
        (out_dir / name).write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
        written.append(name)
    return written


def write_complete_folder(model: nn.Module, processor, base: str | None, out_dir: str | Path) -> dict:
    """Save ``model`` and ``processor`` to ``out_dir`` as a folder that loads on its own.

    base: the base model path or hub id the folder derives from; its small files the processor did not
    write are copied. Returns ``{"copied": [...], "flat": [...], "missing": [...]}`` (``missing`` from
    ``missing_parts``, also logged as a warning).
    """
    out_dir = Path(out_dir)
    if getattr(model, "config", None) is not None:
        model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if not (out_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        (generation or GenerationConfig.from_model_config(model.config)).save_pretrained(out_dir)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out_dir)
    flat = _write_flat_processor_files(processor, out_dir)
    source = base_folder(base) if base else None
    copied = _copy_aux_files(source, out_dir) if source is not None and source.resolve() != out_dir.resolve() else []
    missing = missing_parts(out_dir, processor)
    if missing:
        log.warning("%s lacks %s", out_dir, ", ".join(missing))
    return {"copied": copied, "flat": flat, "missing": missing}


def missing_parts(folder: str | Path, processor=None) -> list[str]:
    """What a model folder lacks for serving: config with ``architectures``, generation config, tokenizer,
    chat template (when ``processor`` has one), image-processor settings (when it has an image processor)."""
    folder = Path(folder)
    missing = []
    config_file = folder / "config.json"
    if not config_file.is_file():
        return ["config.json"]
    if not json.loads(config_file.read_text()).get("architectures"):
        missing.append("architectures in config.json")
    if not (folder / "generation_config.json").is_file():
        missing.append("generation_config.json")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        missing.append("tokenizer files")
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or \
        "chat_template" in _json(folder / "tokenizer_config.json") or "chat_template" in _json(folder / "processor_config.json")
    if getattr(processor, "chat_template", None) and not has_template:
        missing.append("chat template")
    if getattr(processor, "image_processor", None) is not None and not (
            "image_processor" in _json(folder / "processor_config.json") or (folder / "preprocessor_config.json").is_file()):
        missing.append("image-processor settings")
    return missing


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
