"""Adapters we save load in PEFT with the same logits, and adapters PEFT saves load in vlm-lora."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.adapters.peft_format import AdapterError

peft = pytest.importorskip("peft")


def _adapted(model, strategy="language_only", **overrides):
    plan = vlm_lora.plan(model, strategy=strategy, **overrides)
    plan.apply(model)
    randomize_adapters(model)
    return plan


@pytest.mark.parametrize("strategy,overrides", [
    ("language_only", {}),
    ("both", {"language_decoder": {"rank": 4}, "vision_encoder": {"rank": 8, "targets": ["q", "v", "fc1"]}}),
])
def test_saved_adapter_loads_in_peft_with_same_logits(tiny_llava, tiny_batch, tmp_path, strategy, overrides):
    base = copy.deepcopy(tiny_llava)
    plan = _adapted(tiny_llava, strategy, **overrides)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
        plain = base(**tiny_batch).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the model

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["model.multi_modal_projector"]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in keys)
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in keys

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(**tiny_batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_rank_pattern_round_trips_through_peft(tiny_llava, tmp_path):
    _adapted(tiny_llava, "both", vision_encoder={"rank": 8}, language_decoder={"rank": 4, "alpha": 4})
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", [])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert set(config["rank_pattern"].values()) == {8}
    assert all(".vision_tower." in path for path in config["rank_pattern"])


def test_peft_saved_adapter_loads_in_vlm_lora(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                  rank_pattern={"up_proj": 2}, modules_to_save=["multi_modal_projector"])
    peft_config.target_modules = r".*language_model.*\.(q_proj|v_proj|up_proj)"
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peft_model(**tiny_batch).logits
    paths = vlm_lora.load_adapter(base, tmp_path)
    assert len(paths) == 6
    with torch.no_grad():
        ours = base(**tiny_batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_adapter_for_another_base_is_a_clear_error(tiny_llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from conftest import tiny_llava_config

    _adapted(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny-base", ["model.multi_modal_projector"])
    config = tiny_llava_config()
    config.text_config.hidden_size = 64
    other = LlavaForConditionalGeneration(config)
    with pytest.raises(AdapterError, match=r"does not fit 'model.language_model.layers.0.*tiny-base"):
        vlm_lora.load_adapter(other, tmp_path)
    config = tiny_llava_config()
    config.text_config.num_hidden_layers = 1
    with pytest.raises(AdapterError, match="layers.1.* does not have"):
        vlm_lora.load_adapter(LlavaForConditionalGeneration(config), tmp_path)
