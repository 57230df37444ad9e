"""GPU-only checks (skipped on CPU, where CI runs): bf16 autocast LoRA, 4-bit CUDA kernels, a CUDA finetune."""

import copy

import pytest
import torch
from torch import nn

import vlm_lora
from vlm_lora.lora import AdapterSpec, LoraLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_autocast_lora_keeps_fp32_masters_and_matches_fp32_reference():
    torch.manual_seed(0)
    base = nn.Linear(512, 384).cuda()
    layer = LoraLinear(copy.deepcopy(base).to(torch.bfloat16), "default", AdapterSpec(rank=16, alpha=32))
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # master weights
    x = torch.randn(4, 128, 512, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref_layer = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=16, alpha=32))
    ref_layer.lora_A["default"].weight.data.copy_(layer.lora_A["default"].weight)
    ref_layer.lora_B["default"].weight.data.copy_(layer.lora_B["default"].weight)
    ref_layer.base_layer.weight.data.copy_(layer.base_layer.weight.float())
    torch.testing.assert_close(out.float(), ref_layer(x), atol=0.05, rtol=0.02)
    out.float().square().mean().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


def test_qlora_cuda_matches_peft_on_the_same_nf4_layer():
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from vlm_lora.quantize import quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192)).cuda()
    quantize_linears(model, ["0"], compute_dtype="bfloat16")
    assert isinstance(model[0], bnb.nn.Linear4bit)
    ours = copy.deepcopy(model)
    vlm_lora.inject_lora(ours, {"0": AdapterSpec(rank=8, alpha=16)})
    nn.init.normal_(ours[0].lora_B["default"].weight, std=0.05)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(ours[0].lora_A["default"].weight)
    layer.lora_B["default"].weight.data.copy_(ours[0].lora_B["default"].weight)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x).float(), theirs(x).float(), atol=2e-2, rtol=2e-2)


def test_dora_cuda_bf16_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(256, 128).cuda()
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=8, alpha=16, variant="dora"))
    nn.init.normal_(ours.lora_B["default"].weight, std=0.05)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], use_dora=True))
    layer = theirs.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    layer.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    x = torch.randn(4, 256, device="cuda")
    torch.testing.assert_close(ours(x), layer(x), atol=1e-4, rtol=1e-4)


def test_quickstart_steps_on_cuda_lower_the_loss(tmp_path):
    from conftest import ASSET_MODEL
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import finetune

    recipe = load_recipe(ASSET_MODEL.parents[1] / "recipes" / "quickstart.yaml",
                         [f"model.path={ASSET_MODEL}", f"output_dir={tmp_path / 'run'}", "train.max_steps=30",
                          "train.eval_base=false", "data.eval=null", "train.log_steps=5", "train.mixed_precision=bf16",
                          f"data.train={ASSET_MODEL.parents[1] / 'assets/data/microscopy/train.jsonl'}"])
    finetune(recipe)
    import json

    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    assert losses[-1] < 0.5 * losses[0]


def test_fused_lora_path_under_autocast_matches_the_unfused_path():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 192).cuda().to(torch.bfloat16), "default", AdapterSpec(rank=8, alpha=16))
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                out = layer(xi)
            else:
                out = layer.base_layer(xi) + layer.variants["default"].forward_delta(layer, "default", xi, None)
        out.float().square().mean().backward()
        results.append((out.float(), xi.grad.float(), layer.lora_A["default"].weight.grad.clone(),
                        layer.lora_B["default"].weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
