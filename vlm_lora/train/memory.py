"""Memory per rank: the measured peak of every rank, and an estimate per GPU before a run.

``rank_peaks`` is what ``metrics.jsonl`` rows carry as ``peak_mem_mib`` (one entry per rank): the CUDA
allocator's maximum on a GPU, the process's maximum resident set on CPU (which also counts the Python
interpreter and the loaded libraries). ``estimate_memory`` is what ``vlm-lora plan --gpus N`` prints:
base weights (sharded under FSDP, plus the gathered units), LoRA and optimizer state, activations at the
recipe's batch and length; the run logs measured / estimated at the end.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

import torch
from torch import nn

from vlm_lora.train.distributed import gather_objects, wrap_classes

log = logging.getLogger("vlm_lora")
MIB = 2 ** 20
DEFAULT_LENGTH = 1024  # tokens per sample when the recipe sets no train.max_length
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
ADAM_BYTES = 4 + 4 + 8  # float32 weight, gradient, two moments per trainable parameter


def peak_mib(device) -> float:
    """This process's peak memory in MiB: CUDA max allocated on a GPU, max resident set on CPU.

    On Linux the resident peak is ``VmHWM`` of ``/proc/self/status`` (this program's own; ``ru_maxrss``
    also keeps the peak of the process that exec'd it, e.g. a launcher that built a model)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> None:
    """Start a new peak: the CUDA allocator's statistics, or on Linux the resident peak (``clear_refs`` 5)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def rank_peaks(device) -> list[float]:
    """``[peak of rank 0, peak of rank 1, ...]`` in MiB (collective: every rank calls it)."""
    return [round(p, 1) for p in gather_objects(peak_mib(device))]


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one training step."""

    gpus: int
    sharded: bool
    weights: float  # this GPU's part of the base (all of it without FSDP)
    gathered: float  # FSDP: the largest unit's full weights, twice (the one computing, the one prefetched)
    trainable: float  # LoRA / full-mode weights, gradients and Adam state (sharded under FSDP)
    activations: float  # saved for backward at the recipe's batch and length, plus the logits
    assumptions: str

    @property
    def total(self) -> float:
        return self.weights + self.gathered + self.trainable + self.activations

    def __str__(self) -> str:
        mode = f"FSDP over {self.gpus} GPUs" if self.sharded else f"{self.gpus} GPU(s), each with the whole base"
        rows = [("base weights", self.weights), ("gathered FSDP units", self.gathered),
                ("LoRA + optimizer state", self.trainable), ("activations", self.activations),
                ("total per GPU", self.total)]
        lines = [f"memory estimate per GPU ({mode}; {self.assumptions}):"]
        lines += [f"  {name:<24}{value / MIB:12,.1f} MiB" for name, value in rows if value or name != rows[1][0]]
        return "\n".join(lines)


def _weight_bytes(model: nn.Module, plan, recipe) -> dict[str, float]:
    """Bytes of every parameter as the run stores it: the recipe's dtype, 4-bit linears of the quantized
    components at 0.5 byte plus one float32 absmax per 64 weights."""
    quant = recipe.model.quantization
    size = DTYPE_BYTES.get(recipe.model.dtype, 4)
    four_bit = tuple(p + "." for p in plan.prefixes_of([c for c in quant.components if plan.mode_of(c) != "full"])) \
        if quant.bits == 4 else ()
    linears = {f"{path}.weight" for path, module in model.named_modules()
               if four_bit and isinstance(module, nn.Linear) and path.startswith(four_bit)}
    return {name: param.numel() * (0.5 + 4 / 64 if name in linears else size)
            for name, param in model.named_parameters()}


def _activation_bytes(model: nn.Module, recipe, length: int) -> float:
    """Tensors a decoder layer keeps for backward (about 10 x hidden + 4 x intermediate values per token),
    every layer, or the layer inputs only under gradient checkpointing (plus one layer's worth); the
    float32 logits and their gradient; the vision tower the same way at its patch count per image."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):  # timm / open_clip: no transformers config to read
        return 0.0
    batch, size = recipe.train.batch_size, DTYPE_BYTES.get(recipe.model.dtype, 4)
    checkpointed = recipe.train.gradient_checkpointing != "none"

    def stack(tokens: int, cfg) -> float:
        if cfg is None:
            return 0.0
        hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "width", 0)
        inner = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
        layer = tokens * (10 * hidden + 4 * inner) * size
        layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "depth", 0)
        return tokens * hidden * size * layers + layer if checkpointed else layer * layers

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision = getattr(config, "vision_config", None)
    patches = 0
    if vision is not None and getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        patches = (side // patch) ** 2
    logits = batch * length * getattr(text, "vocab_size", 0) * 4 * 2
    return stack(batch * length, text) + stack(batch * patches, vision) + logits


def estimate_memory(model: nn.Module, plan, recipe, gpus: int = 1) -> MemoryEstimate:
    """Bytes per GPU of a step of ``recipe`` on ``gpus`` GPUs (FSDP when ``train.fsdp``); ``model`` may be
    on the meta device (``plan --meta``) or sharded (numels are the full ones)."""
    sharded = bool(recipe.train.fsdp) and gpus > 1
    per_param = _weight_bytes(model, plan, recipe)
    full = tuple(p + "." for c in plan.components if c.policy.mode == "full" for p in c.prefixes)
    base = sum(v for n, v in per_param.items() if "lora_" not in n and not (full and n.startswith(full)))
    state = plan.trainable_params * ADAM_BYTES
    gathered = 0.0
    if sharded:
        classes = set(wrap_classes(model))
        units = [sum(per_param.get(f"{path}.{n}", 0) for n, _ in module.named_parameters())
                 for path, module in model.named_modules() if type(module).__name__ in classes]
        gathered = 2 * max(units, default=0)
        base, state = base / gpus, state / gpus
    length = recipe.train.max_length or DEFAULT_LENGTH
    assumptions = (f"batch {recipe.train.batch_size} x {length} tokens"
                   + ("" if recipe.train.max_length else " (no train.max_length: assumed)")
                   + f", {recipe.model.dtype}, gradient checkpointing {recipe.train.gradient_checkpointing}")
    return MemoryEstimate(gpus, sharded, base, gathered, state, _activation_bytes(model, recipe, length), assumptions)


def log_against_estimate(peaks: list[float], estimate: MemoryEstimate, device) -> float:
    """Log measured peak / estimate (the largest rank); returns the ratio."""
    ratio = max(peaks) * MIB / max(estimate.total, 1.0)
    where = "CUDA max allocated" if torch.device(device).type == "cuda" else "max RSS, incl. interpreter and libraries"
    log.info("peak memory per rank %s MiB (%s); estimate %.0f MiB per GPU; measured / estimate = %.2f",
             peaks, where, estimate.total / MIB, ratio)
    return ratio
