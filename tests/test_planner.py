"""The planner resolves strategies and overrides into exact module lists and parameter counts."""

import pytest
import torch
from torch import nn

import vlm_lora
from vlm_lora.lora import LoraLinear
from vlm_lora.planner import PlanError


def test_language_only_targets_only_the_decoder(tiny_llava):
    plan = vlm_lora.plan(tiny_llava, "language_only")
    decoder = next(c for c in plan.components if c.component == "language_decoder")
    assert len(decoder.lora_paths) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(p.startswith("model.language_model.layers.") for p in decoder.lora_paths)
    # no leak into the vision tower's q_proj/k_proj/v_proj (LLaVA #1647)
    assert not any("vision_tower" in p for c in plan.components for p in c.lora_paths)
    hidden, inter, kv = 48, 96, 24  # 4 heads of 12, 2 kv heads
    per_layer = 16 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    assert decoder.trainable_params == 2 * per_layer
    connector = next(c for c in plan.components if c.component == "connector")
    assert connector.trainable_params == sum(p.numel() for p in tiny_llava.model.multi_modal_projector.parameters())


def test_apply_sets_requires_grad_exactly(tiny_llava):
    plan = vlm_lora.plan(tiny_llava, "both", vision_encoder={"mode": "full"})
    plan.apply(tiny_llava)
    trainable = {n for n, p in tiny_llava.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in tiny_llava.named_parameters() if n in trainable) == plan.trainable_params
    assert not any("patch_embedding" in n for n in trainable)  # never adapted, even in full mode
    assert any("vision_tower.encoder" in n for n in trainable)
    assert not any(n.startswith("lm_head") for n in trainable)
    assert isinstance(tiny_llava.model.language_model.layers[0].mlp.down_proj, LoraLinear)


def test_overrides_change_rank_alpha_and_targets(tiny_llava):
    plan = vlm_lora.plan(tiny_llava, "both", vision_encoder={"rank": 8, "targets": ["q", "v"]},
                         language_decoder={"rank": 4, "targets": ["q", "v"], "lr": 1e-3})
    vision = next(c for c in plan.components if c.component == "vision_encoder")
    assert vision.policy.rank == 8 and vision.policy.alpha == 16  # alpha follows 2r unless given
    assert len(vision.lora_paths) == 4
    language = next(c for c in plan.components if c.component == "language_decoder")
    assert language.policy.lr == 1e-3 and len(language.lora_paths) == 4
    assert "language_decoder" in str(plan) and "2 x q,v" not in str(plan) and "4 x q,v" in str(plan)
    data = plan.to_dict()
    assert data["trainable_params"] == plan.trainable_params
    assert {c["component"] for c in data["components"]} >= {"vision_encoder", "language_decoder"}


def test_errors_name_the_module_and_the_valid_options(tiny_llava):
    with pytest.raises(PlanError) as info:
        vlm_lora.plan(tiny_llava, "language_only", patch_embedding={"mode": "lora"},
                      language_decoder={"targets": ["q", "qkv"]}, cross_attention={"mode": "lora"})
    message = str(info.value)
    assert "model.vision_tower.embeddings.patch_embedding" in message
    assert "['qkv'] not valid for llava; valid: down, gate, k, o, q, up, v" in message
    assert "llava has no cross_attention" in message
    with pytest.raises(PlanError, match="unknown strategy 'fancy'; valid: language_only"):
        vlm_lora.plan(tiny_llava, "fancy")


def test_unknown_model_lists_its_children():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(2, 2))
    model.add_module("head", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no architecture entry for Sequential.*encoder, head.*register"):
        vlm_lora.plan(model)


def test_strategies_have_descriptions():
    names = vlm_lora.strategies()
    assert {"language_only", "vision_only", "both", "cross_attention", "mm_lora", "connector_only"} <= set(names)
    assert all(isinstance(d, str) and len(d) > 10 for d in names.values())


def test_plan_names_overrides_family_extras_and_drops_unmatched_targets():
    from vlm_lora.architectures.tiny_families import tiny_family_model

    mllama = tiny_family_model("mllama")
    plan = vlm_lora.plan(mllama, "both", vision_encoder={"mode": "frozen"}, language_decoder={"rank": 16})
    text = str(plan)
    assert "strategy both: vision_encoder overridden by components.vision_encoder (mode: frozen)" in text
    assert "language_decoder overridden" not in text  # rank 16 is the strategy's own value
    assert "strategy both: cross_attention adapted too on mllama" in text
    cross = [p for p in plan.adapter_specs() if ".cross_attn." in p]
    layers = mllama.config.text_config.cross_attention_layers
    assert sorted(cross) == sorted(f"model.language_model.layers.{i}.cross_attn.{t}_proj" for i in layers for t in "qkv")
    assert plan.to_dict()["notes"] == plan.notes
    gemma = tiny_family_model("gemma3")  # as the released checkpoints: no vision pooling head
    plan = vlm_lora.plan(gemma, "both", vision_encoder={"targets": ["q", "v", "pool"]})
    vision = next(c for c in plan.components if c.component == "vision_encoder")
    assert vision.policy.targets == ["q", "v"] and "x q,v " in str(plan) and "q,v,pool" not in str(plan).split("\n")[-6]
    assert "components.vision_encoder.targets: pool matches no module" in str(plan)
