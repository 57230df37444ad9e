"""Architecture registry: which module paths of a model are which VLM component.

Knowledge about architectures is data, not code: one ``Architecture`` entry per model
family (the sibling modules of this package; importing the package registers them). Each component lists the module-path prefixes it owns and, for LoRA, a map from
short target names (``q``, ``v``, ``gate`` ...) to the leaf-module names inside it. Adding a
model is adding an entry (see ``register``); nothing else changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger("vlm_lora")

# Leaf names shared by many families (data the entries reuse).
ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one input: a shared-A group
MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
CLIP_VISION_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                       "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}  # CLIP, SigLIP, Idefics3
LLAMA_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # Llama, Qwen2/3, Gemma

COMPONENTS = ("vision_encoder", "cross_attention", "qformer", "connector", "language_decoder", "lm_head")
NEVER_ADAPTED = "patch_embedding"


@dataclass(frozen=True)
class ComponentMap:
    """Where a component lives and which of its leaves LoRA may target.

    prefixes: module-path prefixes owned by the component (``model.language_model``).
    targets: short target name -> leaf-path suffix inside a block (``q`` -> ``self_attn.q_proj``).
        Several names may share one leaf when that leaf is fused (``q``, ``k``, ``v`` -> ``attn.qkv``).
    shared_inputs: groups of sibling leaves called with the same input (``self_attn.q_proj``,
        ``k_proj``, ``v_proj``); their LoRA A matrices are then applied as one matmul.
    fused: fused leaf suffix -> its slice order (``attn.qkv`` -> ``("q", "k", "v")``); a fused
        ``nn.Linear`` is split into equal output slices, an ``nn.MultiheadAttention`` into its
        ``in_proj`` q/k/v slices plus ``o`` for ``out_proj``.
    """

    prefixes: tuple[str, ...]
    targets: dict[str, str] = field(default_factory=dict)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shared_inputs: tuple[tuple[str, ...], ...] = ()  # sibling leaves always fed the same tensor (q/k/v)

    def owns(self, path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in self.prefixes)


@dataclass(frozen=True)
class Architecture:
    name: str
    model_classes: tuple[str, ...]
    components: dict[str, ComponentMap]
    never_adapted: tuple[str, ...]  # module paths (patch embeddings) that no policy may touch
    task: str = "caption"  # the training objective: caption (image-to-text) or classify (image classifier)
    # submodule path -> class names one of which it must have (in its MRO), e.g. BLIP-2's language_model
    submodule_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # FSDP wrap units: class names of decoder layers and vision blocks (those present in a model are used)
    fsdp_wrap_classes: tuple[str, ...] = ()
    # multi-axis rope (Qwen-VL): model config -> function of a padded batch giving each sample's rope positions
    # (see qwen2_vl.mrope_positions); packing needs them per sample. None: 1-D positions
    rope_positions: Callable | None = None
    # images resized by smart_resize into [min_pixels, max_pixels] (Qwen-VL); data.*_pixels budgets need it
    dynamic_resolution: bool = False
    # strategy -> {component: why}: components a strategy also adapts on this family (default policy), e.g.
    # Mllama's cross-attention layers under `both`; the plan prints the reason
    strategy_extras: dict[str, dict[str, str]] = field(default_factory=dict)

    def matches(self, model: nn.Module) -> bool:
        if not any(cls.__name__ in self.model_classes for cls in type(model).__mro__):
            return False
        for path, names in self.submodule_classes.items():
            try:
                sub = model.get_submodule(path)
            except AttributeError:
                return False
            if not any(cls.__name__ in names for cls in type(sub).__mro__):
                return False
        return True

    def component_of(self, path: str) -> str | None:
        for name, comp in self.components.items():
            if comp.owns(path):
                return name
        return None


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture entry; returns it."""
    REGISTRY[arch.name] = arch
    return arch


def detect_architecture(model: nn.Module) -> Architecture:
    """The registry entry for ``model``, chosen by its class name (and its MRO); an unknown
    ``*ForConditionalGeneration`` with the common child names gets a guessed entry and a warning."""
    for arch in REGISTRY.values():
        if arch.matches(model):
            return arch
    guess = guess_architecture(model)
    if guess is not None:
        return guess
    children = ", ".join(name for name, _ in model.named_children()) or "(none)"
    raise ValueError(
        f"vlm-lora has no architecture entry for {type(model).__name__}. Its top-level children are: "
        f"{children}. Add an entry with vlm_lora.architectures.registry.register(Architecture(name=..., "
        f"model_classes=({type(model).__name__!r},), components={{'language_decoder': ComponentMap(('<prefix>',), "
        f"{{'q': 'self_attn.q_proj', ...}}), ...}}, never_adapted=(...)))."
    )


def fsdp_wrap_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of ``model``'s FSDP wrap units (decoder layers, vision blocks), as its registry
    entry names them, keeping only those present in the model (FSDP refuses absent names)."""
    present = {type(m).__name__ for m in model.modules()}
    return tuple(name for name in detect_architecture(model).fsdp_wrap_classes if name in present)


# The generic fallback: child names shared by most transformers VLMs (under ``model.`` in transformers 5).
GUESS_CHILDREN = {
    "vision_encoder": ("vision_tower", "visual", "vision_model"),
    "connector": ("multi_modal_projector", "connector", "merger"),
    "language_decoder": ("language_model", "text_model"),
}
GUESS_TARGETS = {"vision_encoder": CLIP_VISION_TARGETS, "language_decoder": LLAMA_TARGETS}
GUESS_SHARED = {"vision_encoder": (ATTN_QKV,), "language_decoder": (ATTN_QKV, MLP_GATE_UP)}


def guess_architecture(model: nn.Module) -> Architecture | None:
    """An entry guessed from child names for an unknown ``*ForConditionalGeneration`` that has a vision
    and a language child of the common names; None otherwise. Logs a warning naming the guesses."""
    name = type(model).__name__
    if not name.endswith("ForConditionalGeneration"):
        return None
    found: dict[str, str] = {}
    for component, children in GUESS_CHILDREN.items():
        for parent in ("model.", ""):
            path = next((parent + c for c in children if _has_child(model, parent + c)), None)
            if path is not None:
                found[component] = path
                break
    if "vision_encoder" not in found or "language_decoder" not in found:
        return None
    if _has_child(model, "lm_head"):
        found["lm_head"] = "lm_head"
    vision = found["vision_encoder"]
    convs = tuple(p for p, m in model.named_modules() if (p + ".").startswith(vision + ".")
                  and isinstance(m, (nn.Conv2d, nn.Conv3d)))
    components = {c: ComponentMap((path,), GUESS_TARGETS.get(c, {}), shared_inputs=GUESS_SHARED.get(c, ()))
                  for c, path in found.items()}
    log.warning("vlm-lora has no entry for %s; guessed from its child names: %s; never adapted: %s. Check the "
                "plan, then register a proper entry (vlm_lora.architectures.registry.register(Architecture(...)), "
                "see vlm_lora/architectures/llava.py for an example).", name,
                ", ".join(f"{c}={p}" for c, p in found.items()), ", ".join(convs) or "(no convolution found)")
    return Architecture(name=f"guessed:{name}", model_classes=(name,), components=components, never_adapted=convs)


def _has_child(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
