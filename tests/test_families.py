"""Modern VLM families in the registry (Qwen2/2.5/3-VL, Gemma 3, PaliGemma, Idefics3/SmolVLM, Mllama,
InternVL, LLaVA-OneVision): each on a tiny random-init config on CPU and on its default (full-size)
config on the meta device. Expected prefixes and wrap classes are written out by hand below."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm_lora import planner
from vlm_lora.architectures.registry import detect_architecture, fsdp_wrap_classes
from vlm_lora.architectures.tiny_families import FAMILIES, default_family_model, gemma3, tiny_family_model, token_ids
from vlm_lora.lora import iter_lora_layers
from vlm_lora.lora.fused import FusedLinearLora
from vlm_lora.lora.mha import LoraMultiheadAttention

# family -> (entry, vision prefix, connector prefixes, language prefix, wrap classes of the tiny model)
EXPECTED = {
    "qwen2_vl": ("qwen2_vl", "model.visual.blocks", ("model.visual.merger",), "model.language_model",
                 {"Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"}),
    "qwen2_5_vl": ("qwen2_5_vl", "model.visual.blocks", ("model.visual.merger",), "model.language_model",
                   {"Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"}),
    "qwen3_vl": ("qwen3_vl", "model.visual.blocks", ("model.visual.merger", "model.visual.deepstack_merger_list"),
                 "model.language_model", {"Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer"}),
    "qwen3_vl_moe": ("qwen3_vl_moe", "model.visual.blocks",
                     ("model.visual.merger", "model.visual.deepstack_merger_list"), "model.language_model",
                     {"Qwen3VLMoeVisionBlock", "Qwen3VLMoeTextDecoderLayer"}),
    "gemma3": ("gemma3", "model.vision_tower", ("model.multi_modal_projector",), "model.language_model",
               {"SiglipEncoderLayer", "Gemma3DecoderLayer"}),
    "paligemma": ("paligemma", "model.vision_tower", ("model.multi_modal_projector",), "model.language_model",
                  {"SiglipEncoderLayer", "GemmaDecoderLayer"}),
    "idefics3": ("idefics3", "model.vision_model", ("model.connector",), "model.text_model",
                 {"Idefics3EncoderLayer", "LlamaDecoderLayer"}),
    "smolvlm": ("idefics3", "model.vision_model", ("model.connector",), "model.text_model",
                {"SmolVLMEncoderLayer", "LlamaDecoderLayer"}),
    "mllama": ("mllama", "model.vision_model", ("model.multi_modal_projector",), "model.language_model",
               {"MllamaVisionEncoderLayer", "MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"}),
    "internvl": ("internvl", "model.vision_tower", ("model.multi_modal_projector",), "model.language_model",
                 {"InternVLVisionLayer", "Qwen2DecoderLayer"}),
    "llava_onevision": ("llava", "model.vision_tower", ("model.multi_modal_projector",), "model.language_model",
                        {"SiglipEncoderLayer", "Qwen2DecoderLayer"}),
}
FAMILY_NAMES = list(EXPECTED)
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
ALL_LORA = {"vision_encoder": {"mode": "lora", "rank": 4}, "connector": {"mode": "lora", "rank": 4},
            "language_decoder": {"mode": "lora", "rank": 4}, "lm_head": {"mode": "lora", "rank": 4}}


def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(EXPECTED)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _all_targets(model: nn.Module, component: str) -> list[str]:
    return sorted(detect_architecture(model).components[component].targets)


def _check_family(model: nn.Module, family: str) -> None:
    """Detection, components found, LoRA only on linears outside embeddings, LM vs vision targets apart,
    no parameter owned by two components, and the table's trainable count equal to the model's."""
    entry, vision, connectors, language, _ = EXPECTED[family]
    arch = detect_architecture(model)
    assert arch.name == entry
    plan = planner.plan(model, "both")
    for cp in plan.components:
        assert cp.prefixes, f"{family}: {cp.component} found no module"
    # every component in LoRA mode with every target it has (the pooling head's `pool` included)
    overrides = {c: {**p, "targets": _all_targets(model, c) or None} for c, p in ALL_LORA.items()}
    if not any(isinstance(m, nn.Linear) for c in connectors for m in model.get_submodule(c).modules()):
        overrides["connector"] = {"mode": "full"}  # Gemma 3: a bare projection matrix, no nn.Linear
    full_lora = planner.plan(model, "both", overrides)
    modules = dict(model.named_modules())
    for path in full_lora.adapter_specs():
        assert isinstance(modules[path], (nn.Linear, nn.MultiheadAttention)), path
        assert not any(_under(path, n) for n in arch.never_adapted), path
        assert "embed" not in path.rsplit(".", 1)[-1], path
    by_component = {c.component: c.lora_paths for c in full_lora.components}
    assert by_component["language_decoder"] and all(_under(p, language) for p in by_component["language_decoder"])
    assert by_component["vision_encoder"] and all(_under(p, vision) for p in by_component["vision_encoder"])
    assert all(any(_under(p, c) for c in connectors) for p in by_component["connector"])
    owners: dict[str, str] = {}
    everything_full = planner.plan(model, "both", {c: {"mode": "full"} for c in arch.components})
    for cp in everything_full.components:
        for prefix in cp.full_prefixes:
            for name, _ in planner.named_params_at(model, prefix):
                assert owners.setdefault(name, cp.component) == cp.component, f"{name}: two components"
    # the connector trains in full under `both`: exactly the parameters under its prefixes
    connector = next(c for c in plan.components if c.component == "connector")
    assert connector.policy.mode == "full"
    expected = sum(p.numel() for n, p in model.named_parameters() if any(_under(n, c) for c in connectors))
    assert connector.trainable_params == expected > 0
    plan.apply(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == plan.trainable_params
    assert str(plan).splitlines()[-2].startswith("total") and f"{plan.trainable_params:,}" in str(plan)
    assert all(p.requires_grad for n, p in model.named_parameters() if any(_under(n, c) for c in connectors))
    assert not any("patch_embed" in n or "embed_tokens" in n for n in trainable)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_family_plans_and_applies(family):
    model = tiny_family_model(family)
    _check_family(model, family)
    assert set(fsdp_wrap_classes(model)) == EXPECTED[family][4]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_default_config_on_meta_plans_and_applies(family):
    model = default_family_model(family)
    assert next(model.parameters()).is_meta
    _check_family(model, family)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_lora_is_per_slice_and_leaves_k_bit_identical(family):
    model = tiny_family_model(family)
    plan = planner.plan(model, "vision_only")
    specs = plan.adapter_specs()
    qkv = [p for p in specs if p.endswith(".attn.qkv")]
    assert qkv and all(specs[p].slices == ("q", "v") and specs[p].slice_order == ("q", "k", "v") for p in qkv)
    assert not any("patch_embed" in p or "merger" in p for p in specs)
    base = model.get_submodule(qkv[0])
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    plan.apply(model)
    layer = model.get_submodule(qkv[0])
    assert isinstance(layer, FusedLinearLora)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
        x = torch.randn(5, weight.shape[1])
        out, ref = layer(x), nn.functional.linear(x, weight, bias)
    d = weight.shape[0] // 3
    assert torch.equal(out[:, d:2 * d], ref[:, d:2 * d])  # k: not adapted, bit for bit
    assert not torch.allclose(out[:, :d], ref[:, :d]) and not torch.allclose(out[:, 2 * d:], ref[:, 2 * d:])


def test_mllama_cross_attention_strategy_touches_only_cross_attn():
    model = tiny_family_model("mllama")
    plan = planner.plan(model, "cross_attention")
    cross_layers = model.config.text_config.cross_attention_layers
    want = {f"model.language_model.layers.{i}.cross_attn.{t}_proj" for i in cross_layers for t in "qkv"}
    assert set(plan.adapter_specs()) == want
    plan.apply(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".cross_attn." in n or n.startswith("model.multi_modal_projector.") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params
    # the language decoder owns the self-attention layers and the MLPs, never the cross_attn blocks or gates
    decoder = planner.plan(model, "language_only", {"language_decoder": {"mode": "full"}})
    owned = {n for c in decoder.components if c.component == "language_decoder" for p in c.full_prefixes
             for n, _ in planner.named_params_at(model, p)}
    assert not any("cross_attn" in n for n in owned)
    assert any(f"layers.{cross_layers[0]}.mlp." in n for n in owned)


def test_gemma3_pooling_head_is_adapted_only_when_asked():
    model = tiny_family_model("gemma3", config=gemma3(128, token_ids(128), vision_use_head=True))
    assert isinstance(model.get_submodule("model.vision_tower.head.attention"), nn.MultiheadAttention)
    assert not any(".head." in p for p in planner.plan(model, "both").adapter_specs())
    plan = planner.plan(model, "both", vision_encoder={"targets": ["q", "v", "pool"]})
    spec = plan.adapter_specs()["model.vision_tower.head.attention"]
    assert spec.slices == ("q", "k", "v", "o")
    plan.apply(model)
    assert isinstance(model.get_submodule("model.vision_tower.head.attention"), LoraMultiheadAttention)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params


class NewVLForConditionalGeneration(nn.Module):
    """An unregistered VLM with the common child names (borrowed from a tiny LLaVA-OneVision)."""

    def __init__(self, donor: nn.Module):
        super().__init__()
        self.model, self.lm_head = donor.model, donor.lm_head


def test_unknown_common_layout_plans_with_a_warning_naming_its_guesses(caplog):
    model = NewVLForConditionalGeneration(tiny_family_model("llava_onevision"))
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        plan = planner.plan(model, "both")
    message = caplog.text
    for guess in ("vision_encoder=model.vision_tower", "connector=model.multi_modal_projector",
                  "language_decoder=model.language_model", "model.vision_tower.embeddings.patch_embedding",
                  "register"):
        assert guess in message, guess
    assert plan.architecture == "guessed:NewVLForConditionalGeneration"
    reference = planner.plan(tiny_family_model("llava_onevision"), "both")  # the real entry, same modules
    assert set(plan.adapter_specs()) == set(reference.adapter_specs())
    assert plan.trainable_params - reference.trainable_params == 0


def test_unknown_layout_keeps_the_clear_error():
    class OddForConditionalGeneration(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = nn.Linear(2, 2), nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no architecture entry for OddForConditionalGeneration.*encoder, decoder"):
        planner.plan(OddForConditionalGeneration())


def test_existing_entries_name_their_wrap_classes():
    from vlm_lora.architectures.tiny_models import tiny_blip2_opt, tiny_llava, tiny_timm_vit

    assert set(fsdp_wrap_classes(tiny_llava())) == {"CLIPEncoderLayer", "LlamaDecoderLayer"}
    assert set(fsdp_wrap_classes(tiny_blip2_opt())) == {"Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer"}
    assert fsdp_wrap_classes(tiny_timm_vit()) == ("Block",)


# Published parameter counts of the three recipes' checkpoints (the hub's model cards / safetensors
# metadata), in billions: the offline table of published hyperparameters must rebuild exactly these.
RECIPE_MODELS = {"qwen2_5_vl.yaml": ("qwen2_5_vl", 8.29), "gemma3.yaml": ("gemma3", 4.30),
                 "mllama_cross_attention.yaml": ("mllama", 10.67)}


@pytest.fixture
def no_hub(monkeypatch):
    """The hub unreachable and the cache empty, whatever the machine's network."""
    import vlm_lora.modeling as modeling

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipes/ and assets/ from the repo root
    monkeypatch.setattr(modeling, "_reachable", lambda endpoint: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("recipe", RECIPE_MODELS)
def test_family_recipes_plan_on_meta_offline(recipe, no_hub, capsys):
    from vlm_lora.cli import main

    entry, billions = RECIPE_MODELS[recipe]
    assert main(["plan", f"recipes/{recipe}", "--meta", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lora = sum(c["trainable_params"] for c in result["components"] if c["mode"] == "lora")
    assert result["architecture"] == entry
    assert round((result["total_params"] - lora) / 1e9, 2) == billions
    assert {c["component"]: c["mode"] for c in result["components"]}["connector"] == "full"


@pytest.mark.parametrize("path, says", [
    ("/no/such/folder", "no such folder"),
    ("assets", "the folder has no config.json"),
    ("someone/no-such-model", "cannot be reached; download it"),
])
def test_unresolvable_model_path_is_one_fast_line(path, says, no_hub, capsys):
    from vlm_lora.cli import main

    start = time.perf_counter()
    assert main(["plan", "recipes/llava_medical.yaml", "--meta", "--set", f"model.path={path}"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlm-lora plan: error: model path {path}: ") and says in err and "\n" not in err
    assert "HF_HUB_OFFLINE=1" in err or "download" not in says


def test_offline_hub_id_names_the_offline_setting(no_hub, monkeypatch):
    from vlm_lora.modeling import ModelPathError, resolve_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelPathError, match="HF_HUB_OFFLINE is set"):
        resolve_config("someone/no-such-model")
