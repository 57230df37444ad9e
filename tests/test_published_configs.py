"""The offline table of published configs: every shipped recipe's hub id and each family's main
checkpoints build on the meta device with the parameter count the hub lists, and plan."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from conftest import REPO
from vlm_lora.architectures.published_configs import PUBLISHED_CONFIGS, published_config
from vlm_lora.architectures.registry import detect_architecture

# hub id -> (registry entry, parameters in billions as the hub lists them)
EXPECTED = {
    "llava-hf/llava-1.5-7b-hf": ("llava", 7.06),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("llava", 7.57),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("llava", 8.05),
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2_vl", 8.29),
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", 2.21),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", 8.29),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", 3.75),
    "Qwen/Qwen3-VL-8B-Instruct": ("qwen3_vl", 8.77),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": ("qwen3_vl_moe", 31.07),
    "google/gemma-3-4b-it": ("gemma3", 4.30),
    "google/gemma-3-12b-it": ("gemma3", 12.19),
    "google/gemma-3-27b-it": ("gemma3", 27.43),
    "google/paligemma2-3b-pt-224": ("paligemma", 3.03),
    "google/paligemma-3b-pt-224": ("paligemma", 2.92),
    "HuggingFaceM4/Idefics3-8B-Llama3": ("idefics3", 8.46),
    "HuggingFaceTB/SmolVLM-Instruct": ("idefics3", 2.25),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": ("mllama", 10.67),
    "meta-llama/Llama-3.2-90B-Vision-Instruct": ("mllama", 88.59),
    "OpenGVLab/InternVL3-1B-hf": ("internvl", 0.94),
    "OpenGVLab/InternVL3-8B-hf": ("internvl", 7.94),
    "Salesforce/blip2-opt-2.7b": ("blip2_opt", 3.74),
}


def test_every_recipe_hub_id_and_family_is_in_the_table():
    assert set(PUBLISHED_CONFIGS) == set(EXPECTED)
    hub_ids = {yaml.safe_load(path.read_text())["model"]["path"] for path in (REPO / "recipes").glob("*.yaml")}
    hub_ids = {h for h in hub_ids if not h.startswith("assets/")}
    assert hub_ids and hub_ids <= set(PUBLISHED_CONFIGS), hub_ids - set(PUBLISHED_CONFIGS)
    families = {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "paligemma", "idefics3",
                "mllama", "internvl", "blip2_opt"}
    assert {entry for entry, _ in EXPECTED.values()} == families


@pytest.mark.parametrize("hub_id", EXPECTED)
def test_published_config_builds_the_published_size(hub_id):
    entry, billions = EXPECTED[hub_id]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(published_config(hub_id))
    assert detect_architecture(model).name == entry
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


def test_llava_recipe_plans_offline_and_the_hint_names_config_json(monkeypatch, capsys):
    import vlm_lora.modeling as modeling
    from vlm_lora.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(modeling, "_reachable", lambda endpoint: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["plan", "recipes/llava_medical.yaml", "--meta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "llava"
    assert main(["plan", "recipes/llava_medical.yaml", "--meta", "--set", "model.path=someone/other-vlm"]) == 2
    err = capsys.readouterr().err
    assert "a folder holding just its config.json is enough" in err and "\n" not in err.strip()
