"""What the serving engines accept as a LoRA adapter, as data, and ``check_adapter``: one line per
rule an adapter folder breaks.

Sources (vLLM ``vllm/lora/peft_helper.py``, ``lora_model.py``, ``utils.parse_fine_tuned_lora_name`` and the
models' ``hf_to_vllm_mapper``; SGLang ``srt/lora``; see /work/shared/design/notes/serving-engines.md):

- vLLM: PEFT format; ``modules_to_save`` must be None and DoRA is refused (peft_helper); every tensor must be
  a ``lora_A`` / ``lora_B`` pair (a plain tensor fails ``parse_fine_tuned_lora_name``); LoRA on ``lm_head`` /
  embeddings fails to load; ranks {1, 8, 16, 32, 64, 128, 256, 320, 512}, at most ``--max-lora-rank``
  (default 16); ``rank_pattern`` / ``alpha_pattern`` are dropped; vision-tower / connector LoRA is ignored
  unless ``--enable-tower-connector-lora`` (some families); no LoRA at all for Mllama; a module name that
  matches nothing gives base-model output without an error.
- SGLang: LoRA on the language model only; ``use_rslora`` is ignored (scale alpha / r is used).

Module names. vLLM strips ``base_model.model.`` from a LoRA tensor's name and passes the rest through the
model's ``hf_to_vllm_mapper``, the same map that loads the base checkpoint. The transformers-5 names
(``model.language_model.layers.0.self_attn.q_proj``) that our exported base and adapter both carry are
therefore mapped to vLLM's own (``language_model.model.layers.0.self_attn.q_proj`` for LLaVA and Qwen-VL).
A vLLM that lacks the map for these names could not load the exported base either, which carries the
same names, so the two always agree. Adapters whose names are vLLM's own pass through the mapper
unchanged, so they also load; anything else
(``model.layers.0...`` from an adapter trained on the text-only CausalLM) matches no module and is served
as the base model (vLLM issues 34186, 39369). ``VLLM_PREFIXES`` lists the map per family; ``check_adapter``
accepts a name if it is a module of the base or if it is the vLLM name of one. SGLang files a LoRA tensor
under the decoder layer its ``layers.N.`` names and its leaf name (``q_proj``), whatever the prefix; a
vision tower's ``layers.N.`` would land on decoder layer N, one more reason to merge all tower LoRA for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from torch import nn

from vlm_lora.adapters.peft_format import PREFIX, WEIGHTS_NAME, AdapterError, read_adapter_config

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LANGUAGE = "language_decoder"
TOWER = ("vision_encoder", "connector")
PISSA_INITS = ("pissa", "olora", "corda", "eva")  # PEFT adapters that expect a modified (residual) base

_LLAVA_NAMES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}
_QWEN_NAMES = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
               "lm_head.": "language_model.lm_head."}
# registry family -> transformers-5 prefix -> vLLM's module prefix (its hf_to_vllm_mapper, read from vLLM's
# models/*.py); {} where vLLM's names are transformers' (Idefics3: model.text_model, model.vision_model).
# InternVL's entry assumes the LLaVA layout of transformers' InternVLForConditionalGeneration (not read from vLLM)
VLLM_PREFIXES = {"llava": _LLAVA_NAMES, "gemma3": _LLAVA_NAMES, "paligemma": _LLAVA_NAMES, "internvl": _LLAVA_NAMES,
                 "qwen2_vl": _QWEN_NAMES, "qwen2_5_vl": _QWEN_NAMES, "qwen3_vl": _QWEN_NAMES,
                 "qwen3_vl_moe": _QWEN_NAMES, "idefics3": {},
                 "mllama": {"model.language_model.": "language_model.model.", "model.vision_model.": "vision_model.",
                            "model.multi_modal_projector.": "multi_modal_projector.",
                            "lm_head.": "language_model.lm_head."}}


@dataclass(frozen=True)
class EngineRules:
    """One engine's rules for served adapters.

    ranks: ranks it serves (None: any); default_max_rank: without a flag; tower_flag: the flag that turns
    on vision-tower / connector LoRA, for ``tower_families`` (registry names); no_lora_families: families
    it serves no LoRA for at all; honours_rslora: whether it reads ``use_rslora``; leaf_targets: write
    ``target_modules`` as leaf names (``q_proj``), the form every version of the engine reads.
    """

    name: str
    title: str
    ranks: tuple[int, ...] | None
    default_max_rank: int | None
    honours_rslora: bool
    tower_flag: str | None = None
    tower_families: tuple[str, ...] = ()
    no_lora_families: tuple[str, ...] = ()
    leaf_targets: bool = False
    prefixes: dict[str, dict[str, str]] = field(default_factory=dict)

    def served_rank(self, rank: int) -> int:
        """The smallest rank >= ``rank`` the engine serves (zero-padding to it is exact)."""
        if self.ranks is None:
            return rank
        for allowed in self.ranks:
            if allowed >= rank:
                return allowed
        raise AdapterError(f"rank {rank} is above the largest rank {self.title} serves ({self.ranks[-1]})")

    def serves_tower(self, family: str | None) -> bool:
        return self.tower_flag is not None and family in self.tower_families


ENGINES = {
    "vllm": EngineRules(
        "vllm", "vLLM", VLLM_RANKS, 16, honours_rslora=True, tower_flag="--enable-tower-connector-lora",
        # vLLM PRs 26674 (Qwen-VL, Idefics3), 31513 (LLaVA), 31620 (BLIP-2), 31656 (PaliGemma), Gemma 3
        tower_families=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "idefics3", "llava", "paligemma",
                        "gemma3", "blip2_opt"),
        no_lora_families=("mllama",), prefixes=VLLM_PREFIXES),
    # SGLang: any rank, the language model only; Mllama's interleaved cross-attention layers: merged too
    "sglang": EngineRules("sglang", "SGLang", None, None, honours_rslora=False, no_lora_families=("mllama",),
                          leaf_targets=True),
}


def engine_rules(engine: str) -> EngineRules:
    if engine not in ENGINES:
        raise AdapterError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[engine]


_TOWER_WORDS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "connector", "merger")


def component_of(path: str, arch) -> str | None:
    """The registry component of a module path; without an architecture, a guess from common names."""
    if arch is not None:
        return arch.component_of(path)
    leaf = path.rsplit(".", 1)[-1]
    if _is_head(path):
        return "lm_head" if leaf == "lm_head" else "embedding"
    if any(f".{w}." in f".{path}." for w in _TOWER_WORDS):
        return "vision_encoder"
    return LANGUAGE


def _is_head(target: str) -> bool:
    leaf = target.rsplit(".", 1)[-1]
    return leaf == "lm_head" or "embed" in leaf


def _targets(state_keys: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(LoRA target -> its lora_A key, plain tensors, DoRA magnitudes) among an adapter file's keys."""
    pairs, plain, magnitudes = {}, [], []
    for key in state_keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".lora_A." in key or ".lora_embedding_A" in key:
            pairs[name.split(".lora_")[0]] = key
        elif "lora_magnitude_vector" in key:
            magnitudes.append(name)
        elif ".lora_B." not in key and ".lora_embedding_B" not in key:
            plain.append(name)
    return pairs, plain, magnitudes


def hf_name(target: str, prefixes: dict[str, str]) -> str:
    """The transformers name of a module the engine names ``target`` (its prefix mapped back), or ``target``."""
    for hf, engine in prefixes.items():
        if target.startswith(engine):
            return hf + target[len(engine):]
    return target


def check_adapter(adapter_dir: str | Path, engine: str, base: nn.Module | None = None,
                  max_lora_rank: int | None = None, keep_tower: bool = False) -> list[str]:
    """One line per rule of ``engine`` that the PEFT adapter in ``adapter_dir`` breaks; [] when it passes.

    base: the base model (on the meta device is enough) for the family rules and the module-name check;
    without it those two checks are skipped. max_lora_rank: the engine's ``--max-lora-rank`` (vLLM: 16 if
    not given); keep_tower: vision / connector LoRA is meant to be served with the engine's tower flag.
    """
    from vlm_lora.architectures.registry import detect_architecture

    rules = engine_rules(engine)
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        return [f"{WEIGHTS_NAME} is missing ({rules.title} reads adapter weights from it)"]
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        ranks = {k: f.get_slice(k).get_shape()[0] for k in _targets(keys)[0].values()}
    pairs, plain, magnitudes = _targets(keys)
    arch = detect_architecture(base) if base is not None else None
    family = arch.name if arch is not None else None
    modules = {name for name, _ in base.named_modules()} if base is not None else set()
    # names the engine uses itself are checked under their transformers name
    pairs = {(t if t in modules else hf_name(t, rules.prefixes.get(family, {}))): k for t, k in pairs.items()}
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']}: {rules.title} accepts None only; "
                        f"merge those modules into the base (vlm-lora export)")
    if plain:
        problems.append(f"{len(plain)} fully-trained tensors (e.g. {plain[0]}): {rules.title} loads LoRA pairs "
                        f"only; merge them into the base")
    if config.get("use_dora") or magnitudes:
        problems.append(f"DoRA (use_dora): {rules.title} serves plain LoRA only; merge the adapter into the base")
    if str(config.get("init_lora_weights")).lower() in PISSA_INITS:
        problems.append(f"init_lora_weights is {config['init_lora_weights']!r}: the adapter expects PEFT's "
                        f"residual base; convert it to a LoRA of the original base first")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}: {rules.title} needs 'none'")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append(f"rank_pattern / alpha_pattern set: {rules.title} drops them and uses r = {config.get('r')},"
                        f" lora_alpha = {config.get('lora_alpha')} for every module")
    if config.get("use_rslora") and not rules.honours_rslora:
        problems.append(f"use_rslora: {rules.title} ignores it and scales by alpha / r; fold alpha / sqrt(r) "
                        f"into lora_alpha")
    if family in rules.no_lora_families and pairs:
        problems.append(f"{rules.title} serves no LoRA for {family} models; merge the adapter into the base")
    head = sorted(t for t in pairs if _is_head(t) or component_of(t, arch) == "lm_head")
    if head:
        problems.append(f"LoRA on {', '.join(head)}: {rules.title} fails to load LoRA on lm_head / embeddings; "
                        f"merge it into the base")
    if rules.ranks is not None:
        bad = sorted({r for r in ranks.values() if r not in rules.ranks})
        if bad:
            problems.append(f"rank {', '.join(map(str, bad))} not served by {rules.title} (allowed: "
                            f"{', '.join(map(str, rules.ranks))}); zero-pad to the next allowed rank")
        limit = max_lora_rank or rules.default_max_rank
        if ranks and max(ranks.values()) > limit:
            how = "raise --max-lora-rank" if max_lora_rank else f"above the default --max-lora-rank {limit}"
            problems.append(f"rank {max(ranks.values())} > {limit}: {how} (serve with --max-lora-rank "
                            f"{rules.served_rank(max(ranks.values()))})")
    tower = sorted(t for t in pairs if component_of(t, arch) in TOWER)
    kept = keep_tower and rules.tower_flag is not None and (family is None or rules.serves_tower(family))
    if tower and not kept:
        if rules.tower_flag is None:
            why = f"{rules.title} adapts the language model only"
        elif base is not None and not rules.serves_tower(family):
            why = f"{rules.title} serves no vision / connector LoRA for {family}"
        else:
            why = f"{rules.title} ignores it without {rules.tower_flag}"
        problems.append(f"{len(tower)} vision-tower / connector modules (e.g. {tower[0]}): {why}; merge them")
    other = sorted(t for t in pairs if component_of(t, arch) not in TOWER + (LANGUAGE, "lm_head", "embedding", None))
    if other:
        problems.append(f"{len(other)} modules outside the language model (e.g. {other[0]}, "
                        f"{component_of(other[0], arch)}): {rules.title} serves the language model's linears only")
    if base is not None:
        unknown = sorted(t for t in pairs if t not in modules)
        if unknown:
            problems.append(f"{len(unknown)} module names match nothing in the base (e.g. {unknown[0]}): "
                            f"{rules.title} would silently serve base-model output for them")
    if not pairs:
        problems.append(f"no LoRA pairs in {WEIGHTS_NAME}: nothing to serve")
    return problems
