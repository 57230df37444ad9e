"""Layer replication: copies share base weights, own LoRA per copy, PEFT's layer_replication in the file."""

import copy
import json

import pytest
import torch

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.adapters.merge import unshare_replicated
from vlm_lora.lora import unload_lora

peft = pytest.importorskip("peft")
MAP = [[0, 2], [1, 2]]  # 2 decoder layers -> [0, 1, 1]


def test_plan_shows_new_layers_and_shares_base_weights(tiny_llava, tiny_batch):
    plan = vlm_lora.plan(tiny_llava, "language_only", language_decoder={"rank": 2, "layer_replication": MAP})
    layers = tiny_llava.model.language_model.layers
    assert plan.replication["layers"] == [0, 1, 1] and len(layers) == 3
    assert tiny_llava.config.text_config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    decoder = next(c for c in plan.components if c.component == "language_decoder")
    assert plan.replication["added_params"] == decoder.trainable_params // 3 > 0
    assert "[0, 1, 1]" in str(plan) and plan.to_dict()["layer_replication"]["layers"] == [0, 1, 1]
    plan.apply(tiny_llava)
    assert layers[2].self_attn.q_proj.base_layer.weight is layers[1].self_attn.q_proj.base_layer.weight
    assert layers[2].self_attn.q_proj.lora_A["default"] is not layers[1].self_attn.q_proj.lora_A["default"]
    out = tiny_llava.generate(**tiny_batch, max_new_tokens=3, do_sample=False)  # KV cache has 3 slots
    assert out.shape == (2, 13)


def test_replicated_adapter_saves_loads_and_merges(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = vlm_lora.plan(tiny_llava, "language_only", language_decoder={"rank": 2, "layer_replication": MAP})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == MAP
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
    reloaded = copy.deepcopy(base)
    vlm_lora.load_adapter(reloaded, tmp_path)  # replicates the fresh base first
    assert len(reloaded.model.language_model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-5, rtol=0)
        unshare_replicated(reloaded)
        unload_lora(reloaded, merge=True)
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-4, rtol=0)
    layers = reloaded.model.language_model.layers
    assert layers[2].self_attn.q_proj.weight is not layers[1].self_attn.q_proj.weight
    # PEFT 0.21.2's replicate_layers only finds model(.model)*.layers, not a VLM's language_model.layers
    with pytest.raises(ValueError, match="Could not locate the layers"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_replicated_adapter_loads_in_peft_on_a_llama_decoder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_lora.architectures.registry import LLAMA_TARGETS, REGISTRY, Architecture, ComponentMap, register

    arch = register(Architecture("test-llama", ("LlamaForCausalLM",),
                                 {"language_decoder": ComponentMap(("model",), LLAMA_TARGETS),
                                  "connector": ComponentMap(("model.norm",))}, ()))
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
        base = LlamaForCausalLM(config).eval()
        model = copy.deepcopy(base)
        plan = vlm_lora.plan(model, "language_only", connector={"mode": "frozen"},
                             language_decoder={"rank": 2, "layer_replication": [[0, 3], [1, 3]]})
        plan.apply(model)
        randomize_adapters(model)
        vlm_lora.save_adapter(model, tmp_path, "tiny-llama", [])
        ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(1))
        theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        assert len(theirs.base_model.model.model.layers) == 5
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)
    finally:
        REGISTRY.pop(arch.name)


def test_replication_errors_name_the_key(tiny_llava):
    from vlm_lora.planner import PlanError

    with pytest.raises(PlanError, match=r"language_decoder.layer_replication: .*\[0, 5\].* 2 layers"):
        vlm_lora.plan(tiny_llava, "language_only", language_decoder={"layer_replication": [[0, 5]]})
    with pytest.raises(PlanError, match="vision_encoder.layer_replication: only the language_decoder"):
        vlm_lora.plan(tiny_llava, "both", vision_encoder={"layer_replication": [[0, 1]]})


def test_merged_export_of_a_replicated_adapter_is_a_deeper_plain_model(tmp_path):
    from vlm_lora.adapters.merge import _probe_logits, merge_adapter
    from vlm_lora.modeling import load_model_and_processor

    from conftest import ASSET_MODEL

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    n_layers = len(model.model.language_model.layers)
    plan = vlm_lora.plan(model, "language_only", language_decoder={"rank": 2, "layer_replication": [[0, n_layers], [1, 2]]})
    plan.apply(model)
    randomize_adapters(model)
    vlm_lora.save_adapter(model, tmp_path / "adapter", str(ASSET_MODEL), plan.full_prefixes())
    assert merge_adapter(str(ASSET_MODEL), tmp_path / "adapter", tmp_path / "merged")["max_logit_diff"] < 1e-4
    merged, _ = load_model_and_processor(str(tmp_path / "merged"))
    assert len(merged.model.language_model.layers) == n_layers + 1
    with torch.no_grad():
        torch.testing.assert_close(_probe_logits(merged, processor), _probe_logits(model, processor), atol=1e-4, rtol=0)
