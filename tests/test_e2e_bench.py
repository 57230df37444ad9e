"""bench/e2e.py: both systems train on the same tokens; the summary counts what it says."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSET_MODEL, REPO

spec = importlib.util.spec_from_file_location("e2e", REPO / "bench" / "e2e.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


@pytest.mark.parametrize("preset", ["tiny", "qwen-tiny"])
def test_hf_baseline_collator_labels_the_same_tokens_as_vlm_lora(tmp_path, preset):
    """The HF + PEFT side trains on exactly the answer tokens vlm-lora's ChatCollator labels
    (LLaVA: the embedded tiny-llava processor; Qwen2.5-VL: the preset's processor, whole images)."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import CaptionExample

    data = e2e.make_data(tmp_path, 3, 48)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert all(5 <= len(r["caption"].split()) <= 60 for r in rows)
    model_dir = ASSET_MODEL
    if preset == "qwen-tiny":
        model_dir = tmp_path / "qwen"
        e2e.qwen_config(e2e.PRESETS[preset])[1].save_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    items = e2e.CaptionRows(data, processor.tokenizer)
    hf = e2e.PaddingCollator(processor)([items[i] for i in range(3)])
    ours = ChatCollator(processor, prompt=e2e.PROMPT)(
        [(Image.open(tmp_path / r["image"]).convert("RGB"), CaptionExample(r["image"], [r["caption"]], row=i))
         for i, r in enumerate(rows)])
    width = ours["input_ids"].shape[1]
    assert hf["input_ids"].shape[1] == width
    torch.testing.assert_close(hf["input_ids"] * hf["attention_mask"], ours["input_ids"] * ours["attention_mask"])
    torch.testing.assert_close(hf["labels"], ours["labels"])
    assert sum(hf["attention_mask"].sum(1).tolist()) == e2e.real_tokens(model_dir, data)


def test_summary_separates_first_steps_from_steady_state():
    args = argparse.Namespace(skip=2, batch=4, preset="tiny", device="cpu", device_name="cpu", workers=1, vlm_set=[])
    row = e2e.summarize("vlm_lora", [5.0, 3.0, 1.0, 1.0, 2.0], 100.0, tokens=2000, n_samples=20, args=args)
    assert row["total_s"] == 12.0 and row["tokens_per_s"] == round(2000 / 12, 1)
    assert row["first_steps_s"] == [5.0, 3.0] and row["steady_step_s"] == round(4 / 3, 4)
    assert row["steady_samples_per_s"] == round(4 / (4 / 3), 3) and row["steady_tokens_per_s"] == 300.0
    assert row["slowest_steps_s"] == [2.0, 1.0, 1.0] and row["steady_median_s"] == 1.0
    assert row["workers"] == 1 and row["mfu"] is None  # no peak rate on CPU
    assert row["settings"] == []  # vlm-lora's defaults
    args.profile = [4, 1]  # step 4 recorded (the record written after it, counted in step 5 by HF's clock)
    row = e2e.summarize("vlm_lora", [5.0, 3.0, 1.0, 9.0, 7.0, 2.0], 100.0, tokens=2000, n_samples=24, args=args)
    assert row["steady_step_s"] == 1.5 and row["slowest_steps_s"] == [2.0, 1.0] and row["total_s"] == 27.0


def test_mfu_counts_four_flops_per_language_model_parameter_and_token():
    """MFU = 4 x LM params x steady real tokens/s / dense bf16 peak (H100/H200 989 TFLOP/s)."""
    args = argparse.Namespace(skip=0, batch=16, preset="llava-7b", device="cuda", device_name="NVIDIA H100 80GB HBM3",
                              workers=8, vlm_set=[])
    row = e2e.summarize("floor", [0.5, 0.5], 1.0, tokens=2 * 11392, n_samples=32, args=args, lm_params=6_600_000_000)
    assert row["mfu"] == round(4 * 6.6e9 * 11392 / 0.5 / 989e12, 3)
    assert e2e.peak_flops("NVIDIA H200") == 989e12 and e2e.peak_flops("Tesla T4") is None


def test_language_model_params_of_the_tiny_llava():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(ASSET_MODEL)
    expected = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)
    assert e2e.language_model_params(ASSET_MODEL) == expected > 0


def test_hf_systems_get_vlm_loras_default_workers():
    """The HF baselines default to vlm-lora's own loader workers (>= 1 on a machine of several cores)."""
    import os

    from vlm_lora.data.loader import default_workers

    parser_default = default_workers()
    assert parser_default >= (1 if len(os.sched_getaffinity(0)) > 1 else 0)
    assert set(e2e.HF_SYSTEMS) == {"floor", "hf_peft", "hf_peft_compile"}
    assert e2e.HF_SYSTEMS["floor"] == {"lora": False, "compile": True}


def test_fixed_length_collator_pads_to_the_longest_sample_and_labels_the_same_tokens(tmp_path):
    """The compiled HF systems' batches all have the data set's longest length (one static graph) and
    label exactly the tokens of the padding=True batch; the rows name the padding share."""
    from transformers import AutoProcessor

    data = e2e.make_data(tmp_path, 4, 48)
    processor = AutoProcessor.from_pretrained(ASSET_MODEL)
    items = e2e.CaptionRows(data, processor.tokenizer)
    lengths = e2e.row_tokens(ASSET_MODEL, data)
    longest = max(lengths)
    dynamic = e2e.PaddingCollator(processor)([items[i] for i in range(2)])
    fixed = e2e.PaddingCollator(processor, longest)([items[i] for i in range(2)])
    assert fixed["input_ids"].shape[1] == longest and fixed["attention_mask"].sum(1).tolist() == lengths[:2]
    width = dynamic["labels"].shape[1]
    torch.testing.assert_close(fixed["labels"][:, :width], dynamic["labels"])
    assert (fixed["labels"][:, width:] == -100).all()


def test_a_failed_system_keeps_its_whole_output(tmp_path):
    """The last stderr lines of a child are often its progress bar: the whole output goes to a file."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "e2e.py"), "--preset", "tiny", "--steps", "1",
                             "--systems", "vlm_lora", "--work", str(tmp_path), "--vlm-set=train.no_such_key=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["system"] == "vlm_lora" and row["returncode"] == 1
    log = Path(row["log"]).read_text()
    assert log.startswith("exit status 1") and "train.no_such_key" in log


@pytest.mark.parametrize("system", sorted(e2e.VLM_LORA_SYSTEMS))
def test_every_vlm_lora_system_is_a_valid_recipe(tmp_path, system):
    """A system's overrides are checked here, not first on a lent GPU."""
    from vlm_lora.recipe import validate_recipe

    args = argparse.Namespace(device="cuda", workers=8, steps=24, batch=16, vlm_set=[])
    recipe = validate_recipe(e2e.vlm_lora_recipe(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out",
                                                 args, e2e.VLM_LORA_SYSTEMS[system]))
    assert recipe.train.batch_size == 16 and recipe.train.mixed_precision == "bf16"
    assert recipe.data.pad_to_multiple_of == (None if system == "vlm_lora_unpadded" else "auto")
    assert set(e2e.SYSTEM_ENV) <= set(e2e.VLM_LORA_SYSTEMS)
