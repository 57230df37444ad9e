"""The planner: resolve a strategy plus overrides against a model into a ``Plan``.

A Plan says, per component, its mode, the exact module paths that get LoRA (or are
trained in full), rank, alpha, learning rate and trainable parameters. It prints as a
table, serialises with ``to_dict()`` and ``apply(model)`` injects the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from vlm_lora.lora import AdapterSpec, get_variant, inject_lora, iter_lora_layers
from vlm_lora.lora.base import TRAINABLE_KEYS
from vlm_lora.lora.shared import link_shared_inputs
from vlm_lora.policy import STRATEGIES, AdaLoraOptions, ComponentPolicy, FROZEN, DEFAULT_POLICY
from vlm_lora.architectures.replication import replicate_decoder
from vlm_lora.architectures.registry import COMPONENTS, NEVER_ADAPTED, Architecture, ComponentMap, detect_architecture


class PlanError(ValueError):
    """A strategy or policy that cannot be applied to this model."""


@dataclass
class ComponentPlan:
    component: str
    policy: ComponentPolicy
    lora_specs: dict[str, AdapterSpec] = field(default_factory=dict)  # module path -> adapter
    full_prefixes: list[str] = field(default_factory=list)  # module prefixes trained in full
    trainable_params: int = 0
    prefixes: list[str] = field(default_factory=list)  # every module prefix of the component in this model

    @property
    def lora_paths(self) -> list[str]:
        return list(self.lora_specs)


@dataclass
class Plan:
    architecture: str
    strategy: str
    components: list[ComponentPlan]
    total_params: int
    frozen_paths: list[str] = field(default_factory=list)  # never-adapted modules, kept frozen
    shared_inputs: list[tuple[str, ...]] = field(default_factory=list)  # sibling leaves sharing one A matmul
    notes: list[str] = field(default_factory=list)  # what differs from the strategy, printed under the table
    replication: dict | None = None  # layer_replication: {"layers": source index per layer, "added_params": n}

    @property
    def trainable_params(self) -> int:
        return sum(c.trainable_params for c in self.components)

    def adapter_specs(self) -> dict[str, AdapterSpec]:
        """Module path -> AdapterSpec for every LoRA target."""
        return {path: spec for comp in self.components for path, spec in comp.lora_specs.items()}

    def mode_of(self, component: str) -> str | None:
        return next((c.policy.mode for c in self.components if c.component == component), None)

    def prefixes_of(self, components: list[str]) -> list[str]:
        """Module prefixes (that exist in the model) of the named components."""
        return [p for c in self.components if c.component in components for p in c.prefixes]

    def full_prefixes(self) -> list[str]:
        return [p for c in self.components if c.policy.mode == "full" for p in c.full_prefixes]

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model, inject the LoRA adapters and unfreeze fully-trained components."""
        model.requires_grad_(False)
        inject_lora(model, self.adapter_specs())
        for prefix in self.full_prefixes():
            for _, param in named_params_at(model, prefix):
                param.requires_grad_(True)
        for path in self.frozen_paths:
            model.get_submodule(path).requires_grad_(False)
        for name, param in model.named_parameters():
            if any(f".{key}." in name for key in TRAINABLE_KEYS):
                param.requires_grad_(True)
        for _, layer in iter_lora_layers(model):  # LoRA-FA: A stays a fixed projection
            for adapter, variant in getattr(layer, "variants", {}).items():
                if not variant.trains_A:
                    layer.lora_A[adapter].requires_grad_(False)
        link_shared_inputs(model, self.shared_inputs)
        return model

    def component_of_param(self, name: str) -> str | None:
        """Which component a (post-apply) parameter name belongs to."""
        for comp in self.components:
            for prefix in comp.lora_paths + comp.full_prefixes:
                if name == prefix or name.startswith(prefix + "."):
                    return comp.component
        return None

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture, "strategy": self.strategy,
            "total_params": self.total_params, "trainable_params": self.trainable_params,
            "components": [{
                "component": c.component, **c.policy.model_dump(),
                "modules": c.lora_paths or c.full_prefixes, "trainable_params": c.trainable_params,
            } for c in self.components],
            "never_adapted": self.frozen_paths, "notes": self.notes,
            **({"layer_replication": self.replication} if self.replication else {}),
        }

    def __str__(self) -> str:
        header = ("component", "mode", "modules", "rank", "alpha", "lr", "trainable", "%")
        rows = []
        for c in self.components:
            p = c.policy
            lora_mode = p.mode == "lora"
            modules = (f"{len(c.lora_paths)} x {','.join(p.targets or ['all'])}" if lora_mode
                       else ", ".join(c.full_prefixes) if p.mode == "full" else "-")
            rows.append((c.component, p.mode, modules, str(p.rank) if lora_mode else "-",
                         f"{p.alpha:g}" if lora_mode else "-",
                         "-" if p.mode == "frozen" else f"{p.lr:g}" if p.lr else "default",
                         f"{c.trainable_params:,}", f"{100 * c.trainable_params / self.total_params:.3f}"))
        rows.append(("total", "", "", "", "", "", f"{self.trainable_params:,}",
                     f"{100 * self.trainable_params / self.total_params:.3f}"))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [f"plan: {self.architecture}, strategy {self.strategy}, {self.total_params:,} params", *self.notes,
               line(header),
               line(["-" * w for w in widths]), *map(line, rows)]
        if self.frozen_paths:
            out.append("never adapted: " + ", ".join(self.frozen_paths))
        if self.replication:
            out.append(f"language decoder layers (replicated, base weights shared): {self.replication['layers']}; "
                       f"adapters of the added copies: {self.replication['added_params']:,} params")
        return "\n".join(out)


def _resolve_policies(arch: Architecture, strategy: str, overrides: dict[str, ComponentPolicy],
                      errors: list[str], notes: list[str]) -> dict[str, ComponentPolicy]:
    """Strategy defaults with overrides applied, for each component the architecture has; ``notes``
    get the components the family adds to the strategy and those an override changes."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    for name in overrides:
        if name == NEVER_ADAPTED:
            errors.append(f"components.{name}: patch embeddings are never adapted "
                          f"(module {', '.join(arch.never_adapted)}); remove this entry")
        elif name not in COMPONENTS:
            errors.append(f"components.{name}: unknown component; valid: {', '.join(COMPONENTS)}")
        elif name not in arch.components:
            errors.append(f"components.{name}: {arch.name} has no {name}; it has {', '.join(arch.components)}")
    wanted = dict(STRATEGIES[strategy].modes)
    for name, why in arch.strategy_extras.get(strategy, {}).items():  # e.g. Mllama's cross-attention layers
        wanted[name] = DEFAULT_POLICY[name]
        notes.append(f"strategy {strategy}: {name} adapted too on {arch.name} ({why})")
    missing = [c for c in wanted if c not in arch.components]
    if missing:
        errors.append(f"strategy {strategy!r} needs {', '.join(missing)}, which {arch.name} does not have; "
                      f"{arch.name} has {', '.join(arch.components)}")
    policies = {}
    for name in arch.components:
        base = wanted.get(name, FROZEN)
        override = overrides.get(name)
        if override is not None and override.mode == "lora" and base.mode != "lora":
            base = DEFAULT_POLICY.get(name, base).model_copy(update={"mode": "lora"})
        policies[name] = base.merged_with(override)
        default = wanted.get(name, FROZEN).model_dump()
        given = override.model_dump(exclude_none=True) if override is not None else {}
        changed = {k: v for k, v in given.items() if default[k] != v}
        if changed:
            keys = ", ".join(f"{k}: {v}" for k, v in changed.items())
            notes.append(f"strategy {strategy}: {name} overridden by components.{name} ({keys})")
    return policies


def plan(model: nn.Module, strategy: str = "language_only", components: dict | None = None,
         **overrides: dict | ComponentPolicy) -> Plan:
    """Plan LoRA for ``model``.

    >>> p = plan(model, strategy="both", language_decoder={"rank": 8})
    >>> print(p); p.apply(model)

    ``components`` (as in a recipe) and keyword overrides are per-component dicts with any of
    ``mode, rank, alpha, targets, dropout, lr``.
    """
    arch = detect_architecture(model)
    raw = {**(components or {}), **overrides}
    parsed = {k: v if isinstance(v, ComponentPolicy) else ComponentPolicy(**v) for k, v in raw.items()}
    errors: list[str] = []
    notes: list[str] = []
    policies = _resolve_policies(arch, strategy, parsed, errors, notes)

    decoder = policies.get("language_decoder")
    replication = None
    errors += [f"components.{name}.layer_replication: only the language_decoder's layers can be replicated"
               for name, policy in policies.items() if policy.layer_replication and name != "language_decoder"]
    if decoder is not None and decoder.layer_replication:
        try:  # structural: the plan is made of the new layer list
            replication = replicate_decoder(model, arch.components["language_decoder"].prefixes,
                                            decoder.layer_replication)
        except ValueError as error:
            errors.append(f"components.language_decoder.layer_replication: {error}")
    never = [p for p in arch.never_adapted if has_module(model, p)]
    modules = dict(model.named_modules())
    comp_plans = []
    for name, policy in policies.items():
        cmap = arch.components[name]
        cp = ComponentPlan(component=name, policy=policy, prefixes=[p for p in cmap.prefixes if named_params_at(model, p)])
        if policy.mode == "lora":
            user_targets = name in parsed and parsed[name].targets is not None
            if not user_targets and policy.targets and cmap.targets:  # strategy defaults: keep what exists
                policy = policy.model_copy(update={"targets": [t for t in policy.targets if t in cmap.targets]})
                cp.policy = policy
            valid = sorted(cmap.targets) or ["(the module itself)"]
            bad = [t for t in policy.targets or [] if cmap.targets and t not in cmap.targets]
            if bad:
                errors.append(f"components.{name}.targets: {bad} not valid for {arch.name}; valid: {', '.join(valid)}")
                continue
            errors += variant_errors(name, policy)
            matched = _plan_lora(cp, cmap, modules)
            if not cp.lora_specs:
                errors.append(f"components.{name}: no nn.Linear matched targets {policy.targets}")
            elif policy.targets and set(policy.targets) - matched:
                unmatched = [t for t in policy.targets if t not in matched]
                cp.policy = policy.model_copy(update={"targets": [t for t in policy.targets if t in matched]})
                notes.append(f"components.{name}.targets: {', '.join(unmatched)} matches no module of this "
                             f"{type(model).__name__} ({', '.join(cmap.targets[t] for t in unmatched)}); left out")
        elif policy.mode == "full":
            cp.full_prefixes = [p for p in cmap.prefixes if named_params_at(model, p)]
            seen = set()
            for prefix in cp.full_prefixes:
                for pname, param in named_params_at(model, prefix):
                    if id(param) in seen or any(pname.startswith(n + ".") for n in never):
                        continue
                    seen.add(id(param))
                    cp.trainable_params += param.numel()
        comp_plans.append(cp)
    if errors:
        raise PlanError("invalid plan:\n  - " + "\n  - ".join(errors))
    total = sum(p.numel() for p in model.parameters())
    total += sum(c.trainable_params for c in comp_plans if c.policy.mode == "lora")
    shared = [group for c in comp_plans if c.policy.mode == "lora"
              for group in arch.components[c.component].shared_inputs]
    if replication:
        replication["added_params"] = added_copy_params(comp_plans, replication, modules)
    return Plan(architecture=arch.name, strategy=strategy, components=comp_plans, total_params=total,
                frozen_paths=never, shared_inputs=shared, notes=notes, replication=replication)


# inits each variant can start from (VeRA and AdaLoRA have their own; DyLoRA keeps the order of an SVD init)
VARIANT_INITS = {"vera": ("kaiming",), "adalora": ("kaiming",), "dylora": ("kaiming", "gaussian", "loftq")}


def variant_errors(name: str, policy: ComponentPolicy) -> list[str]:
    """Settings that a variant would silently ignore or break."""
    errors = []
    allowed = VARIANT_INITS.get(policy.variant)
    if allowed and (policy.init or "kaiming") not in allowed:
        errors.append(f"components.{name}.init: {policy.init} does not apply to variant {policy.variant}; "
                      f"valid: {', '.join(allowed)}")
    if policy.adalora is not None and policy.variant != "adalora":
        errors.append(f"components.{name}.adalora: set only with variant adalora (variant is {policy.variant})")
    return errors


def added_copy_params(comp_plans: list[ComponentPlan], replication: dict, modules: dict[str, nn.Module]) -> int:
    """LoRA params on the layers that repeat an earlier one (what replication adds)."""
    repeats, seen = set(), set()
    for index, source in enumerate(replication["layers"]):
        if source in seen:
            repeats.add(index)
        seen.add(source)
    prefix = replication["path"] + "."
    total = 0
    for comp in comp_plans:
        for path, spec in comp.lora_specs.items():
            if path.startswith(prefix) and int(path[len(prefix):].split(".")[0]) in repeats \
                    and isinstance(modules[path], nn.Linear):
                total += _linear_lora_params(modules[path], spec)
    return total


def _plan_lora(cp: ComponentPlan, cmap: ComponentMap, modules: dict[str, nn.Module]) -> set[str]:
    """Fill ``cp.lora_specs`` and its parameter count: one spec per targeted module, with the
    chosen slices for fused modules (``q``, ``v`` of a ``qkv``). Returns the target names that matched."""
    policy = cp.policy
    spec = AdapterSpec(rank=policy.rank, alpha=policy.alpha, dropout=policy.dropout or 0.0,
                       variant=policy.variant or "lora", init=policy.init or "kaiming", rslora=bool(policy.rslora),
                       extra=tuple((policy.adalora or AdaLoraOptions()).model_dump().items())
                       if policy.variant == "adalora" else ())
    if not cmap.targets:  # the component is a single layer (lm_head): adapt its linears
        leaves = {}
    else:
        leaves: dict[str, list[str]] = {}
        for target in policy.targets or []:
            leaves.setdefault(cmap.targets[target], []).append(target)
    matched: set[str] = set()
    for path, module in modules.items():
        if not cmap.owns(path):
            continue
        if not leaves:
            if isinstance(module, nn.Linear):
                cp.lora_specs[path] = spec
                cp.trainable_params += _linear_lora_params(module, spec)
            continue
        leaf = next((leaf for leaf in leaves if path.endswith("." + leaf)), None)
        if leaf is None:
            continue
        order = cmap.fused.get(leaf)
        if order is None:
            if isinstance(module, nn.Linear):
                cp.lora_specs[path] = spec
                cp.trainable_params += _linear_lora_params(module, spec)
                matched.update(leaves[leaf])
            continue
        if spec.variant != "lora" or spec.init not in ("kaiming", "gaussian"):
            raise PlanError(f"components.{cp.component}: variant {spec.variant!r} with init {spec.init!r} is not "
                            f"available on fused modules ({path}); fused qkv / MultiheadAttention slices take "
                            f"variant lora with init kaiming or gaussian")
        named = leaves[leaf]  # a name that is not a slice (``pool`` for an MHA) adapts every slice
        slices = order if any(t not in order for t in named) else tuple(s for s in order if s in named)
        cp.lora_specs[path] = replace(spec, slices=slices, slice_order=order)
        cp.trainable_params += sum(policy.rank * sum(fused_slice_shape(module, s, order)) for s in slices)
        matched.update(leaves[leaf])
    return matched


def _linear_lora_params(module: nn.Linear, spec: AdapterSpec) -> int:
    """Trainable parameters of one LoRA on a linear: r (in + out); LoRA-FA trains only B; DoRA adds m [out]."""
    variant = get_variant(spec.variant)
    if hasattr(variant, "param_count"):  # variants in their own modules count their own
        return variant.param_count(module.in_features, module.out_features, spec.rank)
    a_params = 0 if spec.variant == "lora_fa" else spec.rank * module.in_features
    return a_params + spec.rank * module.out_features + (module.out_features if spec.variant == "dora" else 0)


def fused_slice_shape(module: nn.Module, slice_name: str, order: tuple[str, ...]) -> tuple[int, int]:
    """(in, out) of one slice of a fused module: a qkv ``nn.Linear`` split into equal output
    slices, or an ``nn.MultiheadAttention`` (q/k/v of ``in_proj``, ``o`` = ``out_proj``)."""
    if isinstance(module, nn.MultiheadAttention):
        dim = module.embed_dim
        return (dim, dim)
    n_in_proj = len([s for s in order if s != "o"])
    return (module.in_features, module.out_features // n_in_proj)


def named_params_at(model: nn.Module, path: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters a component prefix owns: those of the module at ``path``, or the bare
    ``nn.Parameter`` at ``path`` (BLIP-2 ``query_tokens``, open_clip ``visual.proj``); [] if neither."""
    if has_module(model, path):
        return list(model.get_submodule(path).named_parameters(prefix=path))
    try:
        return [(path, model.get_parameter(path))]
    except AttributeError:
        return []


def has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
