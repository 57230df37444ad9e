"""Speed options of a run (``train.kernels``, ``train.gradient_checkpointing``, ``train.compile``, ``data.packing``,
``train.batched_vision_attention``).

Applied after the adapters are in place, in this order: Liger kernels (they replace modules and
forwards), activation checkpointing, then ``torch.compile`` of each decoder layer (regional
compilation: every layer of a stack shares one compiled graph, so compile time stays a few seconds
and LoRA layers, plain ``nn.Module``s with no adapter-selection logic, trace without graph breaks).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from vlm_lora.architectures.registry import detect_architecture
from vlm_lora.train.setup import TrainingError

log = logging.getLogger("vlm_lora")

# model_type -> Liger patch function, for the families Liger patches (liger_kernel.transformers)
LIGER_PATCHERS = {
    "llava": "apply_liger_kernel_to_llava",
    "mllama": "apply_liger_kernel_to_mllama",
    "paligemma": "apply_liger_kernel_to_paligemma",
    "gemma3": "apply_liger_kernel_to_gemma3",
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
    "internvl": "apply_liger_kernel_to_internvl",
    "smolvlm": "apply_liger_kernel_to_smolvlm",
}
# model types whose batches pack as data.packing does it: image features scattered in token order,
# sample boundaries read from position_ids by transformers' mask functions; 1-D positions, or multi-axis
# ones that the registry entry's ``rope_positions`` builds per sample (Qwen-VL, images only)
PACKABLE_MODEL_TYPES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CHECKPOINTING_MODES = ("none", "full", "selective", "offload")


class SpeedOptionError(TrainingError):
    """A speed option that this model or machine cannot use; the message names the key and what to do."""


def apply_speed_options(model, train_cfg, packing: bool = False):
    """Apply ``train.kernels``, ``train.gradient_checkpointing``, ``train.compile`` to ``model`` (in place);
    check that ``data.packing`` suits it. Returns ``model``."""
    if packing:
        check_packable(model)
    if train_cfg.kernels != "none":
        if next(model.parameters()).device.type != "cuda":
            raise SpeedOptionError(f"train.kernels: {train_cfg.kernels} runs Triton kernels on a CUDA GPU; "
                                   "this run is on CPU, set train.kernels: none")
        apply_liger(model, fused_cross_entropy=train_cfg.kernels == "liger_flce")
    batched_vision = getattr(train_cfg, "batched_vision_attention", False)
    if batched_vision == "auto":
        from vlm_lora.train.vision_attention import batch_vision_attention_if_checked

        batch_vision_attention_if_checked(model)
    elif batched_vision:
        from vlm_lora.train.vision_attention import CHUNKED_VISION_ATTENTION, batch_vision_attention

        if not batch_vision_attention(model) and not _uses_flash_attention(model):
            raise SpeedOptionError("train.batched_vision_attention: this model has no chunked vision attention "
                                   f"(supported: {', '.join(CHUNKED_VISION_ATTENTION)}, the Qwen2/2.5/3-VL towers); "
                                   "set train.batched_vision_attention: false")
    enable_gradient_checkpointing(model, train_cfg.gradient_checkpointing)
    if train_cfg.compile:
        compile_decoder_layers(model)
    return model


def _uses_flash_attention(model) -> bool:
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def check_packable(model) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        raise SpeedOptionError(f"data.packing: not supported for {model_type or type(model).__name__} models yet "
                               f"(supported: {', '.join(PACKABLE_MODEL_TYPES)}); set data.packing: false")


def packing_rope_positions(model):
    """``PackingCollator``'s ``rope_positions`` for ``model``: its family's multi-axis rope positions
    function (Qwen-VL), or None for 1-D positions."""
    factory = detect_architecture(model).rope_positions
    return factory(model.config) if factory is not None else None


def packing_row_tokens(model) -> int | None:
    """Row length for ``PackingCollator``: FlashAttention finds sample boundaries from position ids only
    in a single row (one row per micro-batch); mask-based attention gets rows of the longest sample."""
    return 2 ** 31 if _uses_flash_attention(model) else None


# ---------------------------------------------------------------- activation checkpointing

def enable_gradient_checkpointing(model, mode: str = "full") -> None:
    """Recompute activations in backward; inputs need grad so checkpointed blocks reach the adapters.

    ``full``: every checkpointable layer (transformers' ``GradientCheckpointingLayer``s); ``selective``:
    every second one (half the recompute for about half the memory saved); ``offload``: every layer,
    with the tensors saved at the checkpoints (layer inputs) held in pinned CPU memory until backward.
    """
    if mode not in CHECKPOINTING_MODES:
        raise SpeedOptionError(f"train.gradient_checkpointing: unknown mode {mode!r}; valid: "
                               f"{', '.join(CHECKPOINTING_MODES)}")
    if mode == "none":
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        if hasattr(model, "set_grad_checkpointing") and mode == "full":  # timm
            model.set_grad_checkpointing(True)
            return
        raise SpeedOptionError(f"train.gradient_checkpointing: {mode} is not available for {type(model).__name__}"
                               + ("; use full" if hasattr(model, "set_grad_checkpointing") else "; set none"))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = checkpointable_layers(model)
    function = offloaded_checkpoint if mode == "offload" else partial(checkpoint, use_reentrant=False)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = function
        layer.gradient_checkpointing = mode != "selective" or index % 2 == 0


def checkpointable_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def offloaded_checkpoint(function, *args, **kwargs):
    """Non-reentrant checkpoint whose saved inputs live in (pinned) CPU memory until backward."""
    device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
    with torch.autograd.graph.save_on_cpu(pin_memory=device_type == "cuda", device_type=device_type):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


# ---------------------------------------------------------------- regional compilation

def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """``torch.compile`` every checkpointable layer in place (``nn.Module.compile``); returns how many.

    Dynamo's default shapes: a layer compiles for the first length it sees and once more, for any length,
    at the first new one. Compiling for any length from the first step cost more in all: 42.6 s for the
    first step of a LLaVA-7B batch-8 run on an H100, against 10.3 s plus a 4.4 s recompile with the default
    on an H100 at the same batch; on CPU 17.8 s against 11.9 + 3.6 s (README, sessions 30 and 33)."""
    layers = checkpointable_layers(model)
    if not layers:
        raise SpeedOptionError(f"train.compile: found no decoder layers to compile in {type(model).__name__}; "
                               "set train.compile: false")
    for layer in layers:
        layer.compile(backend=backend)
    log.info("train.compile: %d layers compiled (%s)", len(layers), backend)
    return len(layers)


# ---------------------------------------------------------------- Liger kernels

def apply_liger(model, fused_cross_entropy: bool = False) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU (and fused linear cross-entropy if asked) on ``model``.

    Fused linear cross-entropy reads ``lm_head.weight`` directly, so an ``lm_head`` that carries LoRA or
    is trained would get no gradient: refused.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LIGER_PATCHERS:
        raise SpeedOptionError(f"train.kernels: Liger has no kernels for {model_type or type(model).__name__} "
                               f"models (it patches {', '.join(LIGER_PATCHERS)}); set train.kernels: none")
    if fused_cross_entropy:
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
            raise SpeedOptionError("train.kernels: liger_flce computes the loss from lm_head's frozen weight, but "
                                   "lm_head carries LoRA or is trained here; use train.kernels: liger, or freeze "
                                   "components.lm_head")
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        raise SpeedOptionError("train.kernels: liger needs the Liger kernels: pip install 'vlm-lora[kernels]'") from None
    # every patcher's defaults turn its RMSNorm/LayerNorm, RoPE and SwiGLU/GeGLU kernels on
    getattr(liger, LIGER_PATCHERS[model_type])(model=model, cross_entropy=False,
                                               fused_linear_cross_entropy=fused_cross_entropy)
