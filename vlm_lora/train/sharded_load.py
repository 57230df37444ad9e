"""Sharded loading: a base larger than one GPU (or one host's share) goes straight into FSDP2 shards.

With ``train.fsdp: true`` every rank builds the model on the meta device (buffers, which are small, on
the CPU), injects the adapters, shards it with ``fully_shard`` by the registry's wrap classes, allocates
only its own shards (``to_empty``) and fills them from the checkpoint's safetensors files one tensor at a
time, reading just its rows (``safe_open(...).get_slice``). No rank ever holds a full base tensor beyond
the one being read, so a rank's peak is its shards plus the gathered units of a step.

Adapters are created on the CPU while the base is on the meta device (``lora.base.adapter_device``), so
the seeded initialisation draws exactly the values of a 1-process run; they are copied into their shards
after sharding (each rank keeps its rows). Checkpoint keys are renamed to the model's parameter names by
transformers' own conversion mapping (legacy ``language_model.model.*`` layouts).

Not covered (``refusal`` names the reason; the loop then loads the whole base first, as before): 4-bit
QLoRA bases, PiSSA/OLoRA inits and DoRA (they read the base weights when the adapters are made),
Liger kernels, timm/open_clip models, checkpoints that are not safetensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlm_lora.modeling import DTYPES, model_source, resolve_config
from vlm_lora.train.setup import TrainingError

log = logging.getLogger("vlm_lora")


def refusal(recipe) -> str | None:
    """Why ``recipe`` cannot load sharded (None: it can)."""
    if model_source(recipe.model.path) != "transformers":
        return f"{model_source(recipe.model.path)} models load whole"
    if recipe.model.quantization.bits == 4:
        return "4-bit (QLoRA) bases are quantized from the loaded weights"
    if recipe.train.kernels != "none":
        return "train.kernels replaces modules of the loaded model"
    for name, policy in recipe.components.items():
        if getattr(policy, "init", "kaiming") in ("pissa", "olora") or getattr(policy, "variant", "lora") == "dora":
            return f"components.{name}: {policy.init}/{policy.variant} reads the base weights to make the adapters"
    if not _weight_files(recipe.model.path):
        return "the checkpoint has no safetensors files in a local folder"
    return None


def _weight_files(path: str) -> dict[str, Path]:
    """Checkpoint key -> safetensors file of a local model folder ({} if none)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {key: single for key in f.keys()}


def model_on_meta(recipe) -> nn.Module:
    """The recipe's model with parameters on the meta device and real (CPU) buffers, eval mode."""
    config = resolve_config(recipe.model.path, recipe.model.trust_remote_code)
    return meta_model(config, recipe.model.dtype, recipe.model.trust_remote_code)


def meta_model(config, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """The model of a transformers ``config``: parameters on the meta device, buffers (rotary tables,
    position ids) computed on the CPU; eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    # building draws random numbers (loading a checkpoint does not): keep the stream the adapters draw from
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.eval()


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, through transformers' conversion mapping of ``model``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    own = model.state_dict()
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if converted is not None:
            raise TrainingError(f"sharded loading: checkpoint tensor {key} is converted ({converted}) when loaded, "
                                f"which sharded loading does not do; set train.fsdp false or save the model again")
        names[name] = key
    return names


def detach_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move every parameter that is not on the meta device (the adapters) there; returns their values."""
    values = {}
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            continue
        values[name] = param.detach().clone()
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        module._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return values


def local_block(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's tensor of ``param``, the index of its block in the full tensor)."""
    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def fill_shards(model: nn.Module, files: dict[str, Path], names: dict[str, str],
                adapters: dict[str, torch.Tensor]) -> None:
    """Copy every rank's block of every parameter from the safetensors files (or ``adapters``).

    The file is opened for each tensor: its memory map is dropped after each read, so the pages read
    (a resident part of the process while mapped) never add up to more than one tensor's block."""
    from safetensors import safe_open

    missing = []
    for name, param in model.named_parameters():
        local, index = local_block(param)
        if name in adapters:
            local.copy_(adapters[name][index])
            continue
        key = names.get(name.replace(".base_layer.", "."))
        if key is None:
            missing.append(name)
        elif local.numel():
            with safe_open(files[key], "pt") as f:
                local.copy_(f.get_slice(key)[index])
    if missing:
        raise TrainingError(f"sharded loading: {len(missing)} parameter(s) not in the checkpoint: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def load_sharded(recipe, mixed_precision: str, classes: tuple[str, ...], device) -> tuple[nn.Module, object, object]:
    """(sharded model with adapters, processor, plan): meta model -> plan -> adapters -> speed options ->
    ``fully_shard`` -> this rank's shards allocated and read from the checkpoint."""
    from transformers import AutoProcessor

    from vlm_lora.planner import plan as make_plan
    from vlm_lora.train.distributed import shard_model
    from vlm_lora.train.speed import apply_speed_options

    model = model_on_meta(recipe)
    files = _weight_files(recipe.model.path)
    names = checkpoint_names(model, list(files))
    plan = make_plan(model, recipe.strategy, recipe.components)
    plan.apply(model)
    apply_speed_options(model, recipe.train, recipe.data.packing)
    adapters = detach_adapters(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model = shard_model(model, mixed_precision, classes)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    fill_shards(model, files, names, {k: v.to(device) for k, v in adapters.items()})
    processor = AutoProcessor.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    from vlm_lora.train.memory import peak_mib

    log.info("sharded loading: %d tensors read slice by slice from %d file(s), %d adapter tensors; peak memory "
             "so far %.0f MiB", len(names), len(set(files.values())), len(adapters), peak_mib(device))
    return model, processor, plan
