"""Export for serving engines: PEFT over the exported base + adapter gives the adapter model's logits,
the exported adapter passes the engine's rules, several adapters share a base only when they can, and
merged folders are complete (plain transformers generates the adapter model's text)."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlm_lora
from conftest import ASSET_MODEL, randomize_adapters
from vlm_lora.adapters.engine_rules import check_adapter
from vlm_lora.adapters.export import export
from vlm_lora.adapters.folder import missing_parts
from vlm_lora.adapters.merge import probe_batch
from vlm_lora.adapters.peft_format import AdapterError
from vlm_lora.cli import main
from vlm_lora.modeling import load_model_and_processor

peft = pytest.importorskip("peft")


def _adapter(base, out, strategy="language_only", seed=0, **overrides):
    """A vlm-lora adapter of the model at ``base`` with random non-zero updates; returns its logits on the probe."""
    model, processor = load_model_and_processor(str(base))
    plan = vlm_lora.plan(model, strategy, **overrides)
    plan.apply(model)
    randomize_adapters(model, seed=seed)
    vlm_lora.save_adapter(model, out, str(base), plan.full_prefixes())
    batch = {k: v for k, v in probe_batch(processor).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        return model(**batch).logits, batch


def _served_logits(out, batch, adapter="adapter"):
    """Plain transformers + PEFT: the exported base with the exported adapter (or alone)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out / "base").eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, out / adapter).eval()
    with torch.no_grad():
        return model(**batch).logits


def _config(path):
    return json.loads((path / "adapter_config.json").read_text())


def test_quickstart_adapter_exports_for_vllm(tmp_path):
    ours, batch = _adapter(ASSET_MODEL, tmp_path / "quick", language_decoder={"rank": 4})
    before = check_adapter(tmp_path / "quick", "vllm")
    assert any("modules_to_save" in p for p in before) and any("rank 4 not served" in p for p in before)

    report = export(str(ASSET_MODEL), [tmp_path / "quick"], tmp_path / "out", "vllm")
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch), ours, atol=1e-4, rtol=0)
    config = _config(tmp_path / "out" / "adapter")
    assert config["modules_to_save"] is None and config["r"] == 8 and not config["use_dora"]
    assert all(t.startswith("model.language_model.layers.") for t in config["target_modules"])
    base_model = load_model_and_processor(str(tmp_path / "out" / "base"))[0]
    assert check_adapter(tmp_path / "out" / "adapter", "vllm", base_model) == []
    # vLLM's own module names (what its hf_to_vllm_mapper makes of ours) pass too
    shutil.copytree(tmp_path / "out" / "adapter", tmp_path / "vllm_names")
    weights = tmp_path / "vllm_names" / "adapter_model.safetensors"
    save_file({k.replace(".model.language_model.", ".language_model.model."): v for k, v in load_file(weights).items()},
              weights)
    assert check_adapter(tmp_path / "vllm_names", "vllm", base_model) == []
    merged = report["adapters"]["quick"]["merged"]
    assert len(merged) == 1 and "modules_to_save" in next(iter(merged))
    assert report["adapters"]["quick"]["max_logit_diff"] < 1e-4
    script = (tmp_path / "out" / "serve.sh").read_text()
    assert 'vllm serve "$HERE/base" --enable-lora --lora-modules quick="$HERE/adapter" --max-lora-rank 8' in script
    assert missing_parts(tmp_path / "out" / "base") == []


def test_vision_and_lm_adapter_for_sglang_folds_rslora_and_merges_the_tower(tmp_path):
    lora = {"rank": 8, "alpha": 4.0, "rslora": True}
    ours, batch = _adapter(ASSET_MODEL, tmp_path / "both", "both", vision_encoder=lora, language_decoder=lora)
    assert any("use_rslora" in p for p in check_adapter(tmp_path / "both", "sglang"))
    report = export(str(ASSET_MODEL), [tmp_path / "both"], tmp_path / "out", "sglang")
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch), ours, atol=1e-4, rtol=0)
    config = _config(tmp_path / "out" / "adapter")
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(4.0 * 8 ** 0.5)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert check_adapter(tmp_path / "out" / "adapter", "sglang") == []
    reasons = report["adapters"]["both"]["merged"]
    assert any("language model only" in why and all(".vision_tower." in n for n in names)
               for why, names in reasons.items())
    assert "--lora-paths both=" in (tmp_path / "out" / "serve.sh").read_text()


def test_vllm_keeps_tower_lora_when_asked_and_merges_lm_head_lora(tmp_path):
    ours, batch = _adapter(ASSET_MODEL, tmp_path / "both", "both", vision_encoder={"rank": 16},
                           connector={"mode": "frozen"}, lm_head={"mode": "lora", "rank": 4})
    assert any("lm_head" in p for p in check_adapter(tmp_path / "both", "vllm"))
    report = export(str(ASSET_MODEL), [tmp_path / "both"], tmp_path / "out", "vllm", keep_tower=True)
    assert list(report["adapters"]["both"]["merged"].values()) == [["lm_head"]]
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch), ours, atol=1e-4, rtol=0)
    assert "--enable-tower-connector-lora" in report["command"] and "--max-lora-rank 16" in report["command"]
    assert check_adapter(tmp_path / "out" / "adapter", "vllm", None, 16, keep_tower=True) == []
    assert any("vision-tower" in p for p in check_adapter(tmp_path / "out" / "adapter", "vllm", None, 16))


def test_dora_adapter_is_merged_whole(tmp_path):
    ours, batch = _adapter(ASSET_MODEL, tmp_path / "dora", language_decoder={"rank": 4, "variant": "dora"})
    assert any("DoRA" in p for p in check_adapter(tmp_path / "dora", "vllm"))
    report = export(str(ASSET_MODEL), [tmp_path / "dora"], tmp_path / "out", "vllm")
    assert not (tmp_path / "out" / "adapter").exists() and "--enable-lora" not in report["command"]
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch, adapter=None), ours, atol=1e-4, rtol=0)


def test_pissa_adapter_serves_over_the_original_base(tmp_path):
    ours, batch = _adapter(ASSET_MODEL, tmp_path / "pissa", language_decoder={"rank": 4, "init": "pissa"})
    export(str(ASSET_MODEL), [tmp_path / "pissa"], tmp_path / "out", "vllm")
    assert _config(tmp_path / "out" / "adapter")["r"] == 8  # the rank-2r plain LoRA of the original base
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,strategy,served,keep", [("qwen2_5_vl", "both", True, False),
                                                         ("qwen2_5_vl", "vision_only", True, True),
                                                         ("mllama", "cross_attention", False, False)])
def test_family_exports(tmp_path, family, strategy, served, keep):
    from vlm_lora.architectures.tiny_processors import save_tiny_family

    base = save_tiny_family(family, tmp_path / "base")
    ours, batch = _adapter(base, tmp_path / "a", strategy)
    report = export(str(base), [tmp_path / "a"], tmp_path / "out", "vllm", keep_tower=keep)
    assert (tmp_path / "out" / "adapter").exists() == served
    torch.testing.assert_close(_served_logits(tmp_path / "out", batch, "adapter" if served else None), ours,
                               atol=1e-4, rtol=0)
    if served:
        base_model = load_model_and_processor(str(base))[0]
        rank = report["adapters"]["a"]["rank"]  # Qwen's fused qkv: q and v slices of rank 32 are one rank-64 pair
        assert check_adapter(tmp_path / "out" / "adapter", "vllm", base_model, rank, keep) == []
        assert any(".visual." in t for t in _config(tmp_path / "out" / "adapter")["target_modules"]) == keep
    else:
        assert any("no LoRA for mllama" in why for why in report["adapters"]["a"]["merged"])


def test_several_adapters_share_a_base_only_with_equal_merged_parts(tmp_path):
    frozen = {"connector": {"mode": "frozen"}, "language_decoder": {"rank": 8}}
    first, batch = _adapter(ASSET_MODEL, tmp_path / "one", seed=1, **frozen)
    second, _ = _adapter(ASSET_MODEL, tmp_path / "two", seed=2, **frozen)
    report = export(str(ASSET_MODEL), [tmp_path / "one", tmp_path / "two"], tmp_path / "out", "vllm")
    for name, logits in (("one", first), ("two", second)):
        torch.testing.assert_close(_served_logits(tmp_path / "out", batch, f"adapters/{name}"), logits,
                                   atol=1e-4, rtol=0)
    assert "--lora-modules one=" in report["command"] and "--max-loras 2" in report["command"]

    _adapter(ASSET_MODEL, tmp_path / "c1", seed=1)
    _adapter(ASSET_MODEL, tmp_path / "c2", seed=2)
    with pytest.raises(AdapterError, match="multi_modal_projector.*vlm-lora merge"):
        export(str(ASSET_MODEL), [tmp_path / "c1", tmp_path / "c2"], tmp_path / "no", "vllm")


def test_check_cli_lists_one_line_per_problem(tmp_path, capsys):
    _adapter(ASSET_MODEL, tmp_path / "a", language_decoder={"rank": 32})
    # the names an adapter of the text-only CausalLM has: vLLM would serve base-model output
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k.replace("model.language_model.", "model."): v for k, v in state.items()},
              tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(SystemExit) as exit_code:
        main(["export", "--for", "vllm", "--check", str(tmp_path / "a"), "--base", str(ASSET_MODEL)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert exit_code.value.code == 1 and len(lines) == 4, lines
    for words in ("modules_to_save", "fully-trained tensors", "rank 32 > 16", "match nothing in the base"):
        assert sum(words in line for line in lines) == 1, (words, lines)


def test_transformers_export_is_complete_and_generates_the_adapter_text(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    plan = vlm_lora.plan(model, "language_only")
    plan.apply(model)
    randomize_adapters(model, seed=5)
    vlm_lora.save_adapter(model, tmp_path / "a", str(ASSET_MODEL), plan.full_prefixes())
    assert main(["export", "--for", "transformers", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "a"),
                 "--out", str(tmp_path / "m")]) == 0
    assert missing_parts(tmp_path / "m", processor) == []
    assert (tmp_path / "m" / "preprocessor_config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    loaded = AutoProcessor.from_pretrained(tmp_path / "m")
    assert merged.config.architectures == ["LlavaForConditionalGeneration"]
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.chat_template == processor.chat_template and len(loaded.tokenizer) == len(processor.tokenizer)
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    text = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                       "text": "Describe the image."}]}], add_generation_prompt=True)
    batch = loaded(images=[image], text=[text], return_tensors="pt")
    settings = {"max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        theirs = merged.generate(**batch, **settings)
        ours = model.generate(**batch, **settings)
    assert torch.equal(theirs, ours) and theirs.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_complete_folder_keeps_processor_settings_and_the_base_files(tmp_path, family):
    from transformers import AutoImageProcessor, AutoProcessor

    from vlm_lora.adapters.folder import write_complete_folder
    from vlm_lora.architectures.tiny_processors import save_tiny_family

    base = save_tiny_family(family, tmp_path / "base")
    (base / "tokenizer.model").write_bytes(b"a sentencepiece model the processor does not write")
    model, processor = load_model_and_processor(str(base))
    report = write_complete_folder(model, processor, str(base), tmp_path / "out")
    assert report["copied"] == ["tokenizer.model"] and report["missing"] == []
    loaded = AutoProcessor.from_pretrained(tmp_path / "out")
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.chat_template == processor.chat_template
    # the flat file that readers before transformers 5 use gives the same settings
    flat = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert flat["size"] == processor.image_processor.to_dict()["size"]
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "out")) is type(processor.image_processor)
