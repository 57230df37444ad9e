"""Recipe schema: a YAML file validated with pydantic, every error reported at once.

Recipes are plain YAML a user copies and edits. ``load_recipe`` applies ``--set`` overrides,
validates every key, and raises one ``RecipeError`` listing each problem with its key, the
nearest valid name (``did you mean ...?``) and the valid options. ``check_paths=True`` also
reports data files (and local model folders) that do not exist, in the same list.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from vlm_lora.policy import STRATEGIES, ComponentPolicy
from vlm_lora.architectures.registry import COMPONENTS, NEVER_ADAPTED
from vlm_lora.metrics.names import TASK_METRICS


class RecipeError(ValueError):
    """A recipe that does not validate; the message lists every problem."""


def unknown_name(message: str, name: str, valid, options: str) -> str:
    """``message; did you mean 'x'? options`` (the hint only when a valid name is close)."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return f"{message}; did you mean {close[0]!r}? {options}" if close else f"{message}; {options}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizationConfig(_Strict):
    """QLoRA: store the base linears of ``components`` in 4-bit (bitsandbytes); LoRA on top."""

    bits: Literal[4, 16, 32] = Field(default=16, description="4 quantizes; 16/32 leave the base as loaded")
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    components: list[str] = Field(default_factory=lambda: ["language_decoder"])


class ModelConfig(_Strict):
    path: str = Field(description="local model folder or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(default=False, description="run code shipped with a hub model (off unless set)")
    allow_pickle: bool = Field(default=False, description="also load pickle (.bin) base weights; off: safetensors "
                                                          "only, as pickle files can run code")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)


class VideoConfig(_Strict):
    """Video rows (Qwen2/2.5/3-VL, ``vlm_lora.data.video``): frames sampled per second, their cap, pixels per frame."""

    fps: float = Field(default=2.0, gt=0, description="frames sampled per second of video")
    max_frames: int | None = Field(default=None, ge=1, description="most frames per video (default: the processor's)")
    max_pixels: int | None = Field(default=None, ge=1, description="largest frame area after resizing, in pixels")


class DataConfig(_Strict):
    train: str = Field(description="data: caption JSONL/CSV, LLaVA JSON, imagefolder, parquet (file, glob, folder), "
                                   "a saved HF dataset folder, hf:<hub id>, or WebDataset shards (train-{000..009}.tar)")
    eval: str | None = None
    format: Literal["auto", "caption_jsonl", "caption_csv", "llava_json", "imagefolder", "parquet", "hf_dataset",
                    "webdataset"] = Field(default="auto", description="inferred from the path when auto")
    split: str = Field(default="train", description="split of an HF dataset (saved DatasetDict or hub id)")
    eval_split: str | None = Field(default=None, description="split of data.eval when it is an HF dataset with "
                                                             "splits; default: validation, else test")
    streaming: Literal["auto"] | bool = Field(
        default="auto", description="stream the data (WebDataset shards only; auto: shards stream, others mmap)")
    num_workers: int | None = Field(default=None, ge=0, description="DataLoader workers per process; default: "
                                                                     "CPUs per process - 1 (at most 8); 0: in-process")
    prefetch_factor: int = Field(default=2, ge=1, description="batches each worker prepares ahead")
    group_by_length: bool = Field(default=False, description="seeded length-grouped batches (less padding)")
    image_root: str | None = Field(default=None, description="images are relative to this folder; default: the data file's")
    prompt: str = Field(default="Describe the image.", description="user turn for caption data")
    min_pixels: int | None = Field(default=None, ge=1, description="dynamic-resolution families (Qwen2/2.5/3-VL): "
                                                                   "smallest image area after resizing, in pixels")
    max_pixels: int | None = Field(default=None, ge=1, description="largest image area after resizing (per image)")
    max_total_pixels: int | None = Field(default=None, ge=1, description="cap on the summed image area of one sample")
    video: VideoConfig = Field(default_factory=VideoConfig, description="video rows: fps, max_frames, max_pixels")
    task: Literal["caption", "vqa", "choice"] = Field(
        default="caption", description="what eval scores: caption (bleu1-4, rougeL, cider), vqa (vqa_accuracy, "
                                       "exact_match, anls; question rows), choice (choice_accuracy; rows with options)")
    chat_template: str | None = Field(default=None, description="Jinja template overriding the processor's")
    on_bad_sample: Literal["error", "skip"] = Field(
        default="error", description="missing/corrupt image or too long: stop with its id, or skip and count")
    label_key: str = Field(default="label", description="row key holding the class label (classification)")
    packing: bool = Field(default=False, description="pack each micro-batch's samples whole into rows without padding; "
                                                     "positions restart per sample, attention stays within samples")
    pad_to_multiple_of: int | Literal["auto"] | None = Field(
        default="auto", description="right-pad each batch to a length that is a multiple of this: fewer distinct "
                                    "shapes for train.compile and attention kernels (on CUDA, SDPA's cuDNN kernels "
                                    "build a plan for every new length); the padding is masked and unlabelled (same "
                                    "loss and gradients). auto: 64 on CUDA, none on CPU or with packing; null: none")

    @field_validator("pad_to_multiple_of", mode="before")
    @classmethod
    def _tokens_auto_or_null(cls, value):
        if value is not None and value != "auto" and (not isinstance(value, int) or isinstance(value, bool)
                                                      or value < 1):
            raise ValueError("expected a positive number of tokens, auto or null")
        return value

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _not_with_packing(cls, value, info: ValidationInfo):
        if value not in (None, "auto") and info.data.get("packing"):  # packing is declared (so validated) first
            raise ValueError("packed rows are not padded per batch; set data.packing: false or drop "
                             "data.pad_to_multiple_of")
        return value


class TrainConfig(_Strict):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    save_steps: int | None = Field(default=None, ge=1)
    eval_steps: int | None = Field(default=None, ge=1)
    log_steps: int = Field(default=5, ge=1)
    loraplus_lr_ratio: float | None = Field(default=None, gt=0, description="LoRA+: lr of B = ratio x lr of A (paper: 16)")
    optimizer: Literal["adamw", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    eval_batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    max_length: int | None = Field(default=None, ge=8, description="longest training sequence (tokens)")
    eval_base: bool = Field(default=True, description="also score the eval split with the base model")
    eval_samples: int | None = Field(default=None, ge=1, description="score only the first N eval rows at eval_steps")
    metric_for_best: str | None = Field(default=None, description="keeps adapter/ as the best; default: cider or accuracy")
    save_total_limit: int | None = Field(default=2, ge=1, description="checkpoints kept in output_dir")
    gradient_checkpointing: Literal["none", "full", "selective", "offload"] = Field(
        default="none", description="recompute activations in backward: full (every decoder layer), selective "
                                    "(every other layer), offload (full, saved inputs kept in CPU memory); true = full")
    compile: bool = Field(default=False, description="torch.compile each decoder layer (regional compilation)")
    batched_vision_attention: bool | Literal["auto"] = Field(
        default="auto", description="Qwen2/2.5/3-VL vision towers under SDPA: one attention call per chunk length "
                                    "instead of one per window or image (same attention per chunk). auto: on for "
                                    "those towers with a transformers release whose vision attention was checked; "
                                    "true: on (refused for a model without them); false: transformers' path")
    head_on_labels: bool = Field(default=True, description="lm_head and loss on the answer positions only (same "
                                 "loss and gradients; LLaVA, Qwen-VL); false: the model's loss over every position")
    kernels: Literal["none", "liger", "liger_flce"] = Field(
        default="none", description="liger: Liger's fused RMSNorm/RoPE/SwiGLU on CUDA (pip install 'vlm-lora[kernels]'); "
                                    "liger_flce: also fused linear cross-entropy (lm_head frozen)")
    fsdp: bool = Field(default=False, description="shard parameters, gradients and optimizer state over the "
                       "processes (FSDP2, one unit per decoder layer / vision block); for bases that do not fit one GPU")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else no")
    tensorboard: bool = Field(default=True, description="write TensorBoard events when tensorboard is installed")
    profile_steps: tuple[int, int] | None = Field(
        default=None, description="[first, count]: record optimizer steps first..first+count-1 with torch.profiler "
                                  "to output_dir/profile/ (trace.json for Perfetto, ops.txt, summary.json)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("metric_for_best")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        """Any task's metric (the run checks its own task's once the model is loaded): a typo fails here,
        before the model loads, not at the first eval."""
        valid = sorted({m for names in TASK_METRICS.values() for m in names} | {"accuracy", "eval_loss"})
        if value is not None and value not in valid:
            raise ValueError(unknown_name(f"unknown metric {value!r}", value, valid, f"valid: {', '.join(valid)}"))
        return value

    @field_validator("profile_steps", mode="before")
    @classmethod
    def _first_and_count(cls, value):
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ValueError("expected [first, count]: the first step to record (counting from 1) and how many")
        return value

    @field_validator("batched_vision_attention", mode="before")
    @classmethod
    def _auto_or_switch(cls, value):  # one message, not one per member of the union
        if value == "auto" or isinstance(value, bool):
            return value
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise ValueError("expected auto, true or false")

    @field_validator("gradient_checkpointing", "kernels", mode="before")
    @classmethod
    def _bool_modes(cls, value, info):
        if value is True:  # gradient_checkpointing: true (older recipes) means full
            return "full" if info.field_name == "gradient_checkpointing" else value
        return "none" if value is False or value is None else value


class Recipe(_Strict):
    model: ModelConfig
    strategy: str = "language_only"
    components: dict[str, ComponentPolicy] = Field(default_factory=dict)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/default"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(unknown_name(f"unknown strategy {value!r}", value, STRATEGIES,
                                          f"valid: {', '.join(STRATEGIES)}"))
        return value

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: dict) -> dict:
        unknown = [k for k in value if k not in COMPONENTS and k != NEVER_ADAPTED]
        if unknown:  # error_lines reports one line per unknown name
            raise PydanticCustomError("unknown_component", "unknown component(s) {names}; valid: {valid}",
                                      {"names": ", ".join(unknown), "valid": ", ".join(COMPONENTS),
                                       "unknown": unknown})
        return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({error.problem}); quote it, "
                              f"e.g. --set '{key}=\"{raw}\"'") from None
    return data


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the location of an 'extra_forbidden' error, for the message."""
    current: Any = model
    inside_dict = False
    for part in loc[:-1]:
        if inside_dict:  # this part is a dict key (a component name): the value type stays
            inside_dict = False
            continue
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(part)
        if info is None:
            return []
        annotation = info.annotation
        args = getattr(annotation, "__args__", ())
        inside_dict = bool(args) and getattr(annotation, "__origin__", None) is dict
        current = args[-1] if inside_dict else annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def error_lines(error: ValidationError) -> list[str]:
    """One ``key: problem`` line per validation error (one per unknown component name)."""
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _field_names(Recipe, err["loc"])
            lines.append(unknown_name(f"{key}: unknown key", err["loc"][-1], valid,
                                      f"valid keys here: {', '.join(valid)}") if valid else f"{key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif err["type"] == "unknown_component":
            valid = list(COMPONENTS) + [NEVER_ADAPTED]
            for name in err["ctx"]["unknown"]:
                lines.append(unknown_name(f"{key}.{name}: unknown component", name, valid,
                                          f"valid: {', '.join(COMPONENTS)}"))
        else:
            lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
    return lines


def format_errors(error: ValidationError | list[str]) -> str:
    lines = error_lines(error) if isinstance(error, ValidationError) else error
    return f"recipe has {len(lines)} error(s):\n  - " + "\n  - ".join(lines)


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith(("hf:", "timm:"))


def path_errors(data: dict) -> list[str]:
    """``data.train``/``data.eval`` files (and a local-looking ``model.path``) that do not exist.

    Relative paths resolve from the current directory. ``model.path`` may be a hub id, so it is
    only checked when it starts with ``.``, ``/`` or ``assets/``.
    """
    lines = []
    section = data.get("data")
    for key in ("train", "eval"):
        value = section.get(key) if isinstance(section, dict) else None
        pattern = isinstance(value, str) and any(c in value for c in "*?{")  # globs and shard patterns: the reader checks
        hub = isinstance(section, dict) and section.get("format") == "hf_dataset"
        if isinstance(value, str) and _is_local(value) and not pattern and not hub and not Path(value).exists():
            lines.append(f"data.{key}: file not found: {value}")
    model = data.get("model")
    value = model.get("path") if isinstance(model, dict) else None
    if isinstance(value, str) and value.startswith((".", "/", "assets/")) and not Path(value).exists():
        lines.append(f"model.path: folder not found: {value}")
    return lines


def validate_recipe(data: dict, check_paths: bool = False) -> Recipe:
    """A ``Recipe`` from a dict, or one ``RecipeError`` listing every problem.

    ``check_paths``: also report missing data files (and local model folders); off by default
    because shipped example recipes name data that is not in the repository.
    """
    lines, recipe = [], None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        lines = error_lines(error)
    if check_paths:
        lines += path_errors(data)
    if lines:
        raise RecipeError(format_errors(lines))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = False) -> Recipe:
    """Read, override and validate a recipe; relative paths resolve from the current directory.

    ``check_paths=True`` (``vlm-lora finetune``) also fails on missing data files, see ``validate_recipe``.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (model, strategy, components, data, train, output_dir)")
    return validate_recipe(apply_overrides(data, overrides or []), check_paths)
