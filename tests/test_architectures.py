"""Every registry entry on its tiny model: components found, no overlap, plans with parameter counts
computed here independently from module shapes, and (once the fused / MHA LoRA layers exist) apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlm_lora
import vlm_lora.architectures.blip2  # noqa: F401  (registration, until architectures/__init__ imports them)
import vlm_lora.architectures.open_clip  # noqa: F401
import vlm_lora.architectures.timm_vit  # noqa: F401
from vlm_lora import planner
from vlm_lora.planner import PlanError
from vlm_lora.policy import STRATEGIES
from vlm_lora.architectures.registry import REGISTRY, detect_architecture
from vlm_lora.architectures.tiny_models import FACTORIES, NUM_QUERY_TOKENS

NAMES = list(FACTORIES)
RANK = 4
PARAMETER_PREFIXES = ("query_tokens", "visual.proj")  # owned as bare nn.Parameters: see test_full_mode


def _each(template: str, indices, kind: str = "linear") -> list[tuple[str, str]]:
    return [(template.format(i=i), kind) for i in indices]


# Expected LoRA targets per tiny model, written out by hand: component -> short name -> [(path, kind)];
# kind: linear, qkv (fused nn.Linear, 3 equal output slices) or mha (nn.MultiheadAttention).
_V, _Q = "vision_model.encoder.layers.{i}.", "qformer.encoder.layer.{i}."
_BLIP2 = {
    "vision_encoder": {**{t: _each(_V + "self_attn.qkv", range(2), "qkv") for t in "qkv"},
                       "o": _each(_V + "self_attn.projection", range(2)),
                       "fc1": _each(_V + "mlp.fc1", range(2)), "fc2": _each(_V + "mlp.fc2", range(2))},
    "cross_attention": {  # cross_attention_frequency 2: layers 0 and 2 only
        "q": _each(_Q + "crossattention.attention.query", (0, 2)),
        "k": _each(_Q + "crossattention.attention.key", (0, 2)),
        "v": _each(_Q + "crossattention.attention.value", (0, 2)),
        "o": _each(_Q + "crossattention.output.dense", (0, 2))},
    "qformer": {"q": _each(_Q + "attention.attention.query", range(3)),
                "k": _each(_Q + "attention.attention.key", range(3)),
                "v": _each(_Q + "attention.attention.value", range(3)),
                "o": _each(_Q + "attention.output.dense", range(3)),
                "fc1": _each(_Q + "intermediate_query.dense", range(3)),
                "fc2": _each(_Q + "output_query.dense", range(3))},
    "connector": {None: [("language_projection", "linear")]},
    "lm_head": {None: [("language_model.lm_head", "linear")]},
}
_OPT = "language_model.model.decoder.layers.{i}."
_T5_ATTENTION = [f"language_model.encoder.block.{i}.layer.0.SelfAttention" for i in range(2)] + [
    f"language_model.decoder.block.{i}.layer.{j}.{a}" for i in range(2) for j, a in ((0, "SelfAttention"),
                                                                                    (1, "EncDecAttention"))]
_T5_FF = [f"language_model.encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)] + [
    f"language_model.decoder.block.{i}.layer.2.DenseReluDense" for i in range(2)]
_CLIP_BLOCK = {**{t: _each("{i}.attn", range(2), "mha") for t in "qkvo"},
               "fc1": _each("{i}.mlp.c_fc", range(2)), "fc2": _each("{i}.mlp.c_proj", range(2))}
_LLAVA_V, _LLAVA_L = "model.vision_tower.encoder.layers.{i}.", "model.language_model.layers.{i}."


def _under(prefix: str, targets: dict) -> dict:
    return {t: [(prefix + p, k) for p, k in paths] for t, paths in targets.items()}


EXPECTED_LORA = {
    "blip2_opt": {**_BLIP2, "language_decoder": {
        "q": _each(_OPT + "self_attn.q_proj", range(2)), "k": _each(_OPT + "self_attn.k_proj", range(2)),
        "v": _each(_OPT + "self_attn.v_proj", range(2)), "o": _each(_OPT + "self_attn.out_proj", range(2)),
        **{t: _each(_OPT + "fc1", range(2)) for t in ("fc1", "up")},
        **{t: _each(_OPT + "fc2", range(2)) for t in ("fc2", "down")}}},
    "blip2_t5": {**_BLIP2, "language_decoder": {
        **{t: [(f"{a}.{t}", "linear") for a in _T5_ATTENTION] for t in "qkvo"},
        "gate": [(f"{f}.wi_0", "linear") for f in _T5_FF], "up": [(f"{f}.wi_1", "linear") for f in _T5_FF],
        "down": [(f"{f}.wo", "linear") for f in _T5_FF]}},
    "timm_vit": {
        "vision_encoder": {**{t: _each("blocks.{i}.attn.qkv", range(2), "qkv") for t in "qkv"},
                           "o": _each("blocks.{i}.attn.proj", range(2)),
                           "fc1": _each("blocks.{i}.mlp.fc1", range(2)), "fc2": _each("blocks.{i}.mlp.fc2", range(2))},
        "connector": {None: [("head", "linear")]}},
    "open_clip": {
        "vision_encoder": _under("visual.transformer.resblocks.", _CLIP_BLOCK),
        "connector": {None: []},  # an nn.Parameter, no nn.Linear: LoRA on it is a PlanError
        "language_decoder": _under("transformer.resblocks.", {**_CLIP_BLOCK, "up": _CLIP_BLOCK["fc1"],
                                                               "down": _CLIP_BLOCK["fc2"]})},
    "llava": {
        "vision_encoder": {**{t: _each(_LLAVA_V + f"self_attn.{t}_proj", range(2)) for t in "qkv"},
                           "o": _each(_LLAVA_V + "self_attn.out_proj", range(2)),
                           "fc1": _each(_LLAVA_V + "mlp.fc1", range(2)), "fc2": _each(_LLAVA_V + "mlp.fc2", range(2))},
        "connector": {"fc1": [("model.multi_modal_projector.linear_1", "linear")],
                      "fc2": [("model.multi_modal_projector.linear_2", "linear")]},
        "language_decoder": {**{t: _each(_LLAVA_L + f"self_attn.{t}_proj", range(2)) for t in "qkvo"},
                             **{t: _each(_LLAVA_L + f"mlp.{t}_proj", range(2)) for t in ("gate", "up", "down")}},
        "lm_head": {None: [("lm_head", "linear")]}},
}

# Expected full-mode parameters: component -> predicate on a parameter name.
_BLIP2_FULL = {
    "vision_encoder": lambda n: n.startswith("vision_model.") and "patch_embedding" not in n,
    "cross_attention": lambda n: ".crossattention." in n,
    "qformer": lambda n: (n.startswith("qformer.") and ".crossattention." not in n) or n == "query_tokens",
    "connector": lambda n: n.startswith("language_projection."),
    "lm_head": lambda n: n.startswith("language_model.lm_head."),
}
EXPECTED_FULL = {
    "blip2_opt": {**_BLIP2_FULL, "language_decoder": lambda n: n.startswith("language_model.model.")},
    "blip2_t5": {**_BLIP2_FULL, "language_decoder": lambda n: n.startswith("language_model.")
                 and not n.startswith("language_model.lm_head.")},
    "timm_vit": {"vision_encoder": lambda n: n.startswith("blocks."), "connector": lambda n: n.startswith("head.")},
    "open_clip": {"vision_encoder": lambda n: n.startswith("visual.transformer."),
                  "connector": lambda n: n == "visual.proj",
                  "language_decoder": lambda n: n.startswith("transformer.")},
    "llava": {"vision_encoder": lambda n: n.startswith("model.vision_tower.") and "patch_embedding" not in n,
              "connector": lambda n: n.startswith("model.multi_modal_projector."),
              "language_decoder": lambda n: n.startswith("model.language_model."),
              "lm_head": lambda n: n.startswith("lm_head.")},
}


@pytest.fixture
def use_entry():
    """The tiny model of a named entry, checked to be detected as that entry."""
    def use(name: str):
        model = FACTORIES[name]()
        assert detect_architecture(model).name == name
        return model
    return use


def _unique_params(model: nn.Module, predicate) -> dict[str, nn.Parameter]:
    out, seen = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if predicate(name) and id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def _lora_count(model: nn.Module, expected: dict[str, tuple[str, set]]) -> int:
    """r * (d_in + d_out) per adapted projection, per slice for fused qkv and MHA, from module shapes."""
    total = 0
    for path, (kind, targets) in expected.items():
        module = model.get_submodule(path)
        if kind == "linear":
            total += RANK * (module.in_features + module.out_features)
        elif kind == "qkv":
            total += len(targets) * RANK * (module.weight.shape[1] + module.weight.shape[0] // 3)
        else:  # mha: q/k/v rows of in_proj_weight [3E, E]; o = out_proj
            for t in targets:
                w = module.out_proj.weight if t == "o" else module.in_proj_weight
                total += RANK * (w.shape[1] + (w.shape[0] if t == "o" else w.shape[0] // 3))
    return total


def _expected_lora(name: str, component: str, targets) -> dict[str, tuple[str, set]]:
    table = EXPECTED_LORA[name][component]
    out: dict[str, tuple[str, set]] = {}
    for t in targets if None not in table else [None]:
        for path, kind in table[t]:
            out.setdefault(path, (kind, set()))[1].add(t)
    return out


def _check_numbers(model: nn.Module, name: str, plan) -> None:
    """Every component's modules and trainable count, and the plan table, against the hand-written maps."""
    lines = str(plan).splitlines()
    for cp in plan.components:
        if cp.policy.mode == "lora":
            assert cp.policy.rank == RANK
            expected = _expected_lora(name, cp.component, cp.policy.targets or [])
            assert set(cp.lora_paths) == set(expected), cp.component
            assert cp.trainable_params == _lora_count(model, expected), cp.component
            for path, spec in cp.lora_specs.items():
                kind, targets = expected[path]
                order = {"qkv": ("q", "k", "v"), "mha": ("q", "k", "v", "o")}.get(kind, ())
                assert spec.slice_order == order and spec.slices == tuple(s for s in order if s in targets)
        elif cp.policy.mode == "full":  # bare nn.Parameters (query_tokens, visual.proj) included
            params = _unique_params(model, EXPECTED_FULL[name][cp.component])
            assert cp.trainable_params == sum(p.numel() for p in params.values()), cp.component
        else:
            assert cp.trainable_params == 0 and not cp.lora_specs
        row = next(line for line in lines if line.startswith(cp.component + " "))
        assert f"{cp.trainable_params:,}" in row
    assert f"{plan.trainable_params:,}" in lines[-2 if plan.frozen_paths else -1]
    never = REGISTRY[name].never_adapted
    assert not any(p == n or p.startswith(n + ".") for p in plan.adapter_specs() for n in never)


def _rank_overrides(name: str, strategy: str) -> dict:
    """Rank RANK for every LoRA component of ``strategy``, targets limited to those the entry has."""
    components = REGISTRY[name].components
    return {c: {"rank": RANK, "targets": [t for t in p.targets if t in components[c].targets]}
            for c, p in STRATEGIES[strategy].modes.items() if p.mode == "lora"}


@pytest.mark.parametrize("name", NAMES)
def test_every_component_and_target_exists(name):
    model = FACTORIES[name]()
    arch = REGISTRY[name]
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for component, cmap in arch.components.items():
        assert any(p in modules or p in params for p in cmap.prefixes), component
        assert set(EXPECTED_LORA[name][component]) == set(cmap.targets) or (not cmap.targets and
                                                                             None in EXPECTED_LORA[name][component])
        for target, paths in EXPECTED_LORA[name][component].items():
            assert target is None or paths, f"{component}.{target} matches nothing"
            for path, kind in paths:
                assert isinstance(modules[path], nn.MultiheadAttention if kind == "mha" else nn.Linear), path
    for path in arch.never_adapted:
        assert isinstance(modules[path], nn.Conv2d)


@pytest.mark.parametrize("name", NAMES)
def test_components_never_overlap(name):
    """No module or parameter is owned by two components (no double adaptation, no double counting)."""
    model = FACTORIES[name]()
    arch = REGISTRY[name]
    paths = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    for path in paths:
        owners = [c for c, cmap in arch.components.items() if cmap.owns(path)]
        assert len(owners) <= 1, (path, owners)
    if name.startswith("blip2"):  # the Q-Former is split exactly in two
        for pname, _ in model.named_parameters():
            if pname.startswith("qformer.") or pname == "query_tokens":
                owner = arch.component_of(pname)
                assert owner == ("cross_attention" if ".crossattention." in pname else "qformer"), pname


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_stay_in_their_component(name, use_entry):
    """Every component with all its targets at once: exactly the expected modules (so the decoder's
    q_proj never lands in the vision tower, nor the Q-Former's query in the cross-attention)."""
    model = use_entry(name)
    for component, cmap in REGISTRY[name].components.items():
        override = {"mode": "lora", "rank": RANK, "targets": sorted(cmap.targets)}  # [] = its linears
        if not any(EXPECTED_LORA[name][component].values()):
            with pytest.raises(PlanError, match=f"components.{component}: no nn.Linear matched"):
                vlm_lora.plan(model, "connector_only", **{component: override})
            continue
        plan = vlm_lora.plan(model, "connector_only", **{component: override})
        _check_numbers(model, name, plan)
        cp = next(c for c in plan.components if c.component == component)
        assert all(REGISTRY[name].component_of(p) == component for p in cp.lora_paths)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", NAMES)
def test_strategy(name, strategy, use_entry):
    model = use_entry(name)
    arch = REGISTRY[name]
    missing = [c for c in STRATEGIES[strategy].modes if c not in arch.components]
    if missing:
        with pytest.raises(PlanError, match=f"strategy '{strategy}' needs {', '.join(missing)}, which {name}"):
            vlm_lora.plan(model, strategy)
        return
    defaults = vlm_lora.plan(model, strategy)  # default targets the entry lacks (OPT, CLIP: gate) are dropped
    for cp in defaults.components:
        if cp.policy.mode == "lora" and arch.components[cp.component].targets:
            wanted = STRATEGIES[strategy].modes[cp.component].targets
            assert cp.policy.targets == [t for t in wanted if t in arch.components[cp.component].targets]
    lora_components = [c for c, p in STRATEGIES[strategy].modes.items() if p.mode == "lora"]
    if lora_components:  # ... but a target the user names must exist
        with pytest.raises(PlanError, match="not valid for"):
            vlm_lora.plan(model, strategy, **{c: {"targets": ["nonexistent"]} for c in lora_components})
    plan = vlm_lora.plan(model, strategy, **_rank_overrides(name, strategy))
    _check_numbers(model, name, plan)
    if "connector" in STRATEGIES[strategy].modes:
        assert next(c for c in plan.components if c.component == "connector").policy.mode == "full"


@pytest.mark.parametrize("name", NAMES)
def test_full_mode_counts(name, use_entry):
    model = use_entry(name)
    never = REGISTRY[name].never_adapted
    for component in REGISTRY[name].components:
        plan = vlm_lora.plan(model, "connector_only", **{component: {"mode": "full"}})
        cp = next(c for c in plan.components if c.component == component)
        params = _unique_params(model, EXPECTED_FULL[name][component])
        assert not any(p.startswith(n + ".") for p in params for n in never)  # patch embedding excluded
        expected = sum(p.numel() for p in params.values())  # bare parameters (query_tokens) included
        assert cp.trainable_params == expected, component
        assert f"{cp.trainable_params:,}" in next(line for line in str(plan).splitlines()
                                                  if line.startswith(component + " "))


@pytest.mark.parametrize("name", NAMES)
def test_detection(name):
    assert detect_architecture(FACTORIES[name]()).name == name


def test_instructblip_uses_the_blip2_map():
    """InstructBLIP: same paths, plus Q-Former text embeddings and a text FFN (intermediate / output) per
    layer, which belong to ``qformer`` in full mode and are not LoRA targets."""
    from vlm_lora.architectures.tiny_models import tiny_instructblip

    model = tiny_instructblip()
    arch = detect_architecture(model)
    assert arch.name == "blip2_opt"
    for pname, _ in model.named_parameters():
        owners = [c for c, cmap in arch.components.items() if cmap.owns(pname)]
        assert len(owners) <= 1, (pname, owners)
        if pname.startswith("qformer.") or pname == "query_tokens":
            assert owners == ["cross_attention" if ".crossattention." in pname else "qformer"], pname
    plan = vlm_lora.plan(model, "cross_attention", cross_attention={"rank": RANK},
                         qformer={"mode": "lora", "rank": RANK, "targets": ["q", "k", "v", "o", "fc1", "fc2"]})
    _check_numbers(model, "blip2_opt", plan)
    plan = vlm_lora.plan(model, "connector_only", qformer={"mode": "full"})
    cp = next(c for c in plan.components if c.component == "qformer")
    assert "qformer.embeddings" in cp.full_prefixes and "qformer.encoder.layer.1.intermediate" in cp.full_prefixes
    expected = _unique_params(model, _BLIP2_FULL["qformer"])
    assert cp.trainable_params in (sum(p.numel() for p in expected.values()),  # once parameters can be owned
                                   sum(p.numel() for n, p in expected.items() if n != "query_tokens"))


# ---------------------------------------------------------------- apply


def _trainable_exactly(model: nn.Module, plan) -> None:
    never = plan.frozen_paths
    full = plan.full_prefixes()
    expected = {n for n, _ in model.named_parameters()
                if (".lora_A." in n or ".lora_B." in n
                    or any(n == p or n.startswith(p + ".") for p in full))
                and not any(n.startswith(p + ".") for p in never)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == plan.trainable_params
    assert not any(n.startswith(p + ".") for n in trainable for p in never)


def _randomize_lora(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def _blip2_batch(vocab: int = 64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 9), generator=g)
    ids[:, :NUM_QUERY_TOKENS] = 3  # image_token_index of the tiny configs
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def test_apply_cross_attention_and_qformer(use_entry):
    """Plain linears only: runs without the fused layers."""
    model = use_entry("blip2_opt")
    plan = vlm_lora.plan(model, "cross_attention", cross_attention={"rank": RANK},
                         qformer={"mode": "lora", "rank": RANK, "targets": ["q", "v", "fc1"]})
    plan.apply(model)
    _trainable_exactly(model, plan)
    layers = model.qformer.encoder.layer
    assert isinstance(layers[0].crossattention.attention.key, vlm_lora.LoraLinear)
    assert not hasattr(layers[1], "crossattention")
    assert isinstance(layers[1].attention.attention.query, vlm_lora.LoraLinear)
    assert not isinstance(layers[1].attention.attention.key, vlm_lora.LoraLinear)
    batch = _blip2_batch()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert model.language_projection.weight.grad is not None
    assert layers[0].crossattention.attention.key.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_t5", "timm_vit"])
def test_apply_fused_qkv(name, use_entry):
    pytest.importorskip("vlm_lora.lora.fused")
    model = use_entry(name)
    strategy = "vision_only" if name == "timm_vit" else "both"
    plan = vlm_lora.plan(model, strategy, **_rank_overrides(name, strategy))
    plan.apply(model)
    _trainable_exactly(model, plan)
    _randomize_lora(model)
    qkv = model.blocks[0].attn.qkv if name == "timm_vit" else model.vision_model.encoder.layers[0].self_attn.qkv
    x = torch.randn(3, qkv.base_layer.in_features)
    out, base = qkv(x).unflatten(-1, (3, -1)), qkv.base_layer(x).unflatten(-1, (3, -1))
    assert torch.equal(out[:, 1], base[:, 1])  # k slice untouched, bit for bit
    assert not torch.allclose(out[:, 0], base[:, 0]) and not torch.allclose(out[:, 2], base[:, 2])


def test_apply_open_clip_mha(use_entry):
    pytest.importorskip("vlm_lora.lora.mha")
    model = use_entry("open_clip")
    plan = vlm_lora.plan(model, "both", **_rank_overrides("open_clip", "both"))
    plan.apply(model)
    _trainable_exactly(model, plan)
    _randomize_lora(model)
    attn = model.visual.transformer.resblocks[0].attn
    in_proj = attn.base_layer.in_proj_weight.detach().clone()
    out_proj = attn.base_layer.out_proj.weight.detach().clone()
    attn.merge()
    dim = attn.base_layer.embed_dim
    merged = attn.base_layer.in_proj_weight
    assert torch.equal(merged[dim:2 * dim], in_proj[dim:2 * dim])  # k untouched
    assert torch.equal(attn.base_layer.out_proj.weight, out_proj)  # o not targeted by vision q, v
    assert not torch.allclose(merged[:dim], in_proj[:dim]) and not torch.allclose(merged[2 * dim:], in_proj[2 * dim:])


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_t5", "timm_vit", "open_clip"])
def test_adapted_model_trains(name, use_entry):
    """After apply, a forward and backward pass run and reach every LoRA A of the vision tower."""
    pytest.importorskip("vlm_lora.lora.fused")
    pytest.importorskip("vlm_lora.lora.mha")
    model = use_entry(name)
    strategy = "vision_only" if name == "timm_vit" else "both"
    vlm_lora.plan(model, strategy, **_rank_overrides(name, strategy)).apply(model)
    _randomize_lora(model)
    images = torch.randn(2, 3, 16, 16)
    if name == "timm_vit":
        loss = model(images).logsumexp(-1).mean()
    elif name == "open_clip":
        image_features, text_features, _ = model(images, torch.randint(0, 64, (2, 8)))
        loss = (image_features @ text_features.T).sum()
    else:
        batch = _blip2_batch()
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".lora_A." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------- saved BLIP-2 with processor


def test_saved_tiny_blip2_round_trip(tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.architectures.tiny_models import save_tiny_blip2

    save_tiny_blip2(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(model).__name__ == "Blip2ForConditionalGeneration" and type(processor).__name__ == "Blip2Processor"
    images = [Image.new("RGB", (20, 30), (200, 10, 10)), Image.new("RGB", (40, 40), (10, 200, 10))]
    batch = processor(images=images, text=["a photo of a cat", "two dogs playing in the park"],
                      return_tensors="pt", padding=True)
    image_id = model.config.image_token_index
    assert (batch["input_ids"][:, :NUM_QUERY_TOKENS] == image_id).all()
    assert (batch["input_ids"][:, NUM_QUERY_TOKENS] == processor.tokenizer.bos_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == image_id) | (batch["attention_mask"] == 0), -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)
    assert isinstance(processor.batch_decode(generated, skip_special_tokens=True)[0], str)
    assert vlm_lora.plan(model, "cross_attention").architecture == "blip2_opt"
