"""LoftQ: lower base quantization error than plain QLoRA, adapters PEFT loads on the LoftQ base,
and merges that rebuild that base from the original one."""

import copy

import pytest
import torch

import vlm_lora
from conftest import ASSET_MODEL, randomize_adapters
from vlm_lora.adapters.loftq_report import run_loftq
from vlm_lora.adapters.merge import _probe_logits, merge_adapter
from vlm_lora.lora import iter_lora_layers
from vlm_lora.modeling import load_model_and_processor
from vlm_lora.quantize import dequantize_linears, quantize_linears

peft = pytest.importorskip("peft")
QUANT = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32", "components": ["language_decoder"]}


def _loftq_model():
    model, processor = load_model_and_processor(str(ASSET_MODEL))
    original = copy.deepcopy(model)
    plan = vlm_lora.plan(model, "language_only", language_decoder={"init": "loftq", "rank": 4, "alpha": 16})
    report = run_loftq(model, plan, "nf4", True)
    quantize_linears(model, plan.prefixes_of(["language_decoder"]), "nf4", True, "float32")
    plan.apply(model)
    return model, processor, original, plan, report


def test_loftq_error_below_plain_qlora_and_peft_loads_the_adapter(tmp_path):
    import bitsandbytes.functional as bnbf

    model, processor, original, plan, report = _loftq_model()
    assert report["error_after"]["language_decoder"] < 0.9 * report["error_before"]["language_decoder"]
    # the stored 4-bit base plus the initial adapter is the reported approximation of W
    originals = dict(original.named_modules())
    squared = 0.0
    for path, layer in iter_lora_layers(model):
        base = layer.base_layer
        dequantized = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        approx = dequantized + layer.delta_weight("default")
        squared += torch.linalg.matrix_norm(originals[path].weight - approx).item() ** 2
    assert squared ** 0.5 == pytest.approx(report["error_after"]["language_decoder"], rel=1e-4)

    randomize_adapters(model)
    vlm_lora.save_adapter(model, tmp_path / "adapter", str(ASSET_MODEL), plan.full_prefixes(),
                          extra_meta={"quantization": QUANT})
    with torch.no_grad():
        ours = _probe_logits(model, processor)
    loftq_base = copy.deepcopy(model)  # PEFT gets the LoftQ base (Q_T) as plain float weights
    vlm_lora.unload_lora(loftq_base, merge=False)
    dequantize_linears(loftq_base)
    theirs = peft.PeftModel.from_pretrained(loftq_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(_probe_logits(theirs, processor), ours, atol=1e-4, rtol=0)

    # merge rebuilds the LoftQ base from the original base and matches the trained model
    report = merge_adapter(str(ASSET_MODEL), tmp_path / "adapter", tmp_path / "merged")
    assert report["max_logit_diff"] < 1e-4
    merged, _ = load_model_and_processor(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(_probe_logits(merged, processor), ours, atol=1e-4, rtol=0)


def test_loftq_without_4bit_is_a_clear_error(tiny_llava):
    from vlm_lora.lora import AdapterSpec, inject_lora

    with pytest.raises(ValueError, match="init loftq needs model.quantization.bits: 4"):
        inject_lora(tiny_llava, {"model.language_model.layers.0.self_attn.q_proj": AdapterSpec(4, 8, init="loftq")})
