"""Architecture registry: which module paths of a model are which VLM component.

Knowledge about architectures is data, not code: one ``Architecture`` entry per model
family (the sibling modules of this package; importing the package registers them). Each component lists the module-path prefixes it owns and, for LoRA, a map from
short target names (``q``, ``v``, ``gate`` ...) to the leaf-module names inside it. Adding a
model is adding an entry (see ``register``); nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

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
    """The registry entry for ``model``, chosen by its class name (and its MRO)."""
    for arch in REGISTRY.values():
        if arch.matches(model):
            return arch
    children = ", ".join(name for name, _ in model.named_children()) or "(none)"
    raise ValueError(
        f"vlm-lora has no architecture entry for {type(model).__name__}. Its top-level children are: "
        f"{children}. Add an entry with vlm_lora.architectures.registry.register(Architecture(name=..., "
        f"model_classes=({type(model).__name__!r},), components={{'language_decoder': ComponentMap(('<prefix>',), "
        f"{{'q': 'self_attn.q_proj', ...}}), ...}}, never_adapted=(...)))."
    )
