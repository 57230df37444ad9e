"""The merged export loads in plain transformers and gives the adapter model's logits."""

import subprocess
import sys

import torch

import vlm_lora
from conftest import ASSET_MODEL, randomize_adapters
from vlm_lora.adapters.merge import merge_adapter
from vlm_lora.modeling import load_model_and_processor


def test_merged_model_matches_adapter_model_in_plain_transformers(tmp_path):
    model, processor = load_model_and_processor(str(ASSET_MODEL))
    plan = vlm_lora.plan(model, "both", vision_encoder={"rank": 4})
    plan.apply(model)
    randomize_adapters(model, seed=3)
    vlm_lora.save_adapter(model, tmp_path / "adapter", str(ASSET_MODEL), plan.full_prefixes())

    report = merge_adapter(str(ASSET_MODEL), tmp_path / "adapter", tmp_path / "merged")
    assert report["merged_layers"] == len(plan.adapter_specs()) and report["max_logit_diff"] < 1e-4

    # A fresh interpreter with no vlm_lora import loads the export and computes logits. Both sides run in
    # float64: in float32 the two summation orders (x @ (W + s B A) vs x @ W + s (x @ A) @ B) differed by
    # 6e-6 here and 4.7e-4 on another CPU, so float32 noise, not the merge, decided the tolerance.
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 120, 160)).save(tmp_path / "probe.png")
    script = f"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'merged')!r}).eval().double()
processor = AutoProcessor.from_pretrained({str(tmp_path / 'merged')!r})
batch = processor(images=[Image.open({str(tmp_path / 'probe.png')!r})], text=["USER: <image>\\nDescribe the image. ASSISTANT: a pink"], return_tensors="pt")
batch["pixel_values"] = batch["pixel_values"].double()
with torch.no_grad():
    torch.save(model(**batch).logits, {str(tmp_path / 'logits.pt')!r})
assert "vlm_lora" not in sys.modules
print(type(model).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LlavaForConditionalGeneration"
    merged_logits = torch.load(tmp_path / "logits.pt")
    batch = processor(images=[Image.open(tmp_path / "probe.png")],
                      text=["USER: <image>\nDescribe the image. ASSISTANT: a pink"], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        adapter_logits = model.double()(**batch).logits
        base_logits = load_model_and_processor(str(ASSET_MODEL))[0].double()(**batch).logits
    assert merged_logits.dtype == adapter_logits.dtype == torch.float64
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    # What is left is the export's float32 storage of W + s B A (relative 6e-8 per weight).
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
