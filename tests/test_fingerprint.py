"""Adapters record the base they were trained on and refuse a base whose adapted modules differ."""

import json
import logging

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlm_lora
from conftest import randomize_adapters, tiny_llava_config
from vlm_lora.adapters.base_weights import (SAMPLE_SIZE, hashable_weight, sample_positions, weight_records,
                                            weight_sample, weight_sha256, weights_mismatch)
from vlm_lora.adapters.fingerprint import config_differences
from vlm_lora.adapters.peft_format import AdapterError

Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"


def _llava(**text_changes):
    config = tiny_llava_config()
    for key, value in text_changes.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture
def adapter_dir(tmp_path):
    model = _llava()
    plan = vlm_lora.plan(model, strategy="language_only")
    plan.apply(model)
    randomize_adapters(model)
    vlm_lora.save_adapter(model, tmp_path, "tiny-base", plan.full_prefixes())
    return tmp_path


def test_fingerprint_is_in_the_sidecar_not_in_the_peft_config(adapter_dir):
    meta = json.loads((adapter_dir / "vlm_lora.json").read_text())
    fingerprint = meta["base_fingerprint"]
    assert fingerprint["model_class"] == "LlavaForConditionalGeneration"
    assert len(fingerprint["config_sha256"]) == 64
    assert fingerprint["module_shapes"][Q_PROJ] == [48, 48]
    assert fingerprint["module_shapes"]["model.language_model.layers.0.self_attn.k_proj"] == [24, 48]
    assert meta["base_config"]["text_config"]["hidden_size"] == 48
    for ignored in ("_name_or_path", "transformers_version", "dtype", "architectures"):
        assert ignored not in meta["base_config"] and ignored not in meta["base_config"]["text_config"]
    assert "use_cache" not in meta["base_config"]["text_config"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "base_fingerprint" not in config and "base_config" not in config


def test_same_base_loads_without_warning(adapter_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        paths = vlm_lora.load_adapter(_llava(), adapter_dir)
    assert Q_PROJ in paths
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_other_hidden_size_names_the_module_and_both_shapes(adapter_dir):
    model = _llava(hidden_size=64, head_dim=16)
    with pytest.raises(AdapterError) as info:
        vlm_lora.load_adapter(model, adapter_dir)
    message = str(info.value)
    assert (f"adapter does not fit {Q_PROJ!r}: it was made for a LlavaForConditionalGeneration ('tiny-base') "
            f"whose {Q_PROJ} is [48, 48]; this model's is [64, 64]") in message
    assert "more modules differ" in message
    assert "text_config.hidden_size 48 vs 64" in message and "text_config.head_dim 12 vs 16" in message
    assert not list(vlm_lora.lora.iter_lora_layers(model))  # checked before anything was injected


def test_other_vocab_size_only_warns(adapter_dir, caplog, tiny_batch):
    model = _llava(vocab_size=80, max_position_embeddings=128)
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        paths = vlm_lora.load_adapter(model, adapter_dir)
    assert Q_PROJ in paths
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "text_config.vocab_size 64 vs 80" in warning and "text_config.max_position_embeddings 64 vs 128" in warning
    with torch.no_grad():
        assert model(**tiny_batch).logits.shape[-1] == 80


def test_fewer_layers_names_a_missing_module(adapter_dir):
    with pytest.raises(AdapterError, match=r"layers\.1\..*which this model does not have.*more are missing"):
        vlm_lora.load_adapter(_llava(num_hidden_layers=1), adapter_dir)


def test_model_without_any_adapted_module_names_the_base(adapter_dir):
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(AdapterError, match=r"has none of the 14 modules.*'tiny-base'"):
        vlm_lora.load_adapter(Other(), adapter_dir)
    (adapter_dir / "vlm_lora.json").unlink()  # without the sidecar, the same check from the weights
    with pytest.raises(AdapterError, match=r"has none of the 14 modules.*'tiny-base'"):
        vlm_lora.load_adapter(Other(), adapter_dir)


def test_peft_made_adapter_without_sidecar_loads(tmp_path, tiny_batch):
    peft = pytest.importorskip("peft")
    import copy

    base = _llava()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert not (tmp_path / "vlm_lora.json").exists()
    with torch.no_grad():
        theirs = peft_model(**tiny_batch).logits
    paths = vlm_lora.load_adapter(base, tmp_path)
    assert len(paths) == 8  # q, v in 2 vision and 2 decoder layers
    with torch.no_grad():
        torch.testing.assert_close(base(**tiny_batch).logits, theirs, atol=1e-5, rtol=0)


def test_config_differences_are_dotted_keys():
    theirs = {"a": 1, "text_config": {"hidden_size": 48, "x": None}}
    ours = {"a": 1, "text_config": {"hidden_size": 64}, "b": "new"}
    assert config_differences(theirs, ours) == ["text_config.hidden_size 48 vs 64",
                                                "text_config.x null vs (missing)", 'b (missing) vs "new"']


# ---------------------------------------------------------------- base weight hashes: another checkpoint


def _other_checkpoint():
    """The same architecture and config as ``_llava()``, other weights (another seed)."""
    config = tiny_llava_config()
    torch.manual_seed(1)
    return LlavaForConditionalGeneration(config).eval()


def test_weight_hashes_cover_first_and_last_adapted_modules_in_any_dtype(adapter_dir):
    hashes = json.loads((adapter_dir / "vlm_lora.json").read_text())["base_fingerprint"]["weights_sha256"]
    shapes = json.loads((adapter_dir / "vlm_lora.json").read_text())["base_fingerprint"]["module_shapes"]
    assert list(hashes) == [Q_PROJ, list(shapes)[-1]] and list(shapes)[-1].endswith("layers.1.mlp.down_proj")
    model = _llava()
    weight = model.get_submodule(Q_PROJ).weight
    assert weight_sha256(weight) == hashes[Q_PROJ]
    as_bf16 = weight.to(torch.bfloat16)  # a bfloat16 checkpoint loaded in bfloat16, float16 or float32
    assert weight_sha256(as_bf16) == weight_sha256(as_bf16.to(torch.float16)) == weight_sha256(as_bf16.float())
    assert weight_sha256(weight * (1 + 2 ** -6)) != hashes[Q_PROJ]
    meta = json.loads((adapter_dir / "vlm_lora.json").read_text())
    assert weights_mismatch(model, meta) is None and Q_PROJ in weights_mismatch(_other_checkpoint(), meta)
    # a float32 checkpoint loaded in float16 rounds twice: another hash, but the sampled values agree
    half = _llava().half()
    assert weight_sha256(half.get_submodule(Q_PROJ).weight) != hashes[Q_PROJ]
    assert weights_mismatch(half, meta) is None
    with torch.no_grad():  # a light fine-tune (1% per weight) is another checkpoint
        half.get_submodule(Q_PROJ).weight.mul_(1.01)
    assert Q_PROJ in weights_mismatch(half, meta)


def test_other_checkpoint_warns_on_load_and_merge_refuses_unless_forced(adapter_dir, tmp_path, caplog, capsys):
    from conftest import ASSET_MODEL
    from vlm_lora.cli import main
    from vlm_lora.modeling import load_model_and_processor

    other = _other_checkpoint()
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        vlm_lora.load_adapter(other, adapter_dir)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"the base weights of {Q_PROJ} differ from those the adapter was trained on" in warning
    assert "config differs" not in warning  # the config is the same: only the hash tells
    # through the CLI: an adapter of the embedded tiny LLaVA, merged into a retrained copy of it
    base, processor = load_model_and_processor(str(ASSET_MODEL))
    plan = vlm_lora.plan(base, strategy="language_only", connector={"mode": "frozen"})
    plan.apply(base)
    randomize_adapters(base)
    vlm_lora.save_adapter(base, tmp_path / "adapter", str(ASSET_MODEL), [])
    retrained, _ = load_model_and_processor(str(ASSET_MODEL))
    with torch.no_grad():
        for param in retrained.parameters():
            param.mul_(1.01)
    retrained.save_pretrained(tmp_path / "retrained")
    processor.save_pretrained(tmp_path / "retrained")
    args = ["merge", "--base", str(tmp_path / "retrained"), "--adapter", str(tmp_path / "adapter"), "--out"]
    assert main(args + [str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "differ from those the adapter was trained on" in err and "--force" in err
    assert not (tmp_path / "merged").exists()
    assert main(args + [str(tmp_path / "multi"), "--adapter", str(tmp_path / "adapter"), "--method", "linear",
                        "--as", "model"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "merged"), "--force"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["merge", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged_same")]) == 0
    meta = json.loads((adapter_dir / "vlm_lora.json").read_text())
    del meta["base_fingerprint"]["weights_sha256"]  # an adapter from before the hashes: not checked
    (adapter_dir / "vlm_lora.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        vlm_lora.load_adapter(_other_checkpoint(), adapter_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_4bit_layers_are_not_hashed():
    pytest.importorskip("bitsandbytes")
    from vlm_lora.quantize import quantize_linears

    model = _llava()
    plan = vlm_lora.plan(model, strategy="both", connector={"mode": "frozen"})
    quantize_linears(model, plan.prefixes_of(["language_decoder"]), compute_dtype="float32")
    plan.apply(model)
    paths = list(plan.adapter_specs())
    hashes = weight_records(model, paths)["weights_sha256"]
    vision = [p for p in paths if "vision_tower" in p]
    assert list(hashes) == [vision[0], vision[-1]]  # the 4-bit decoder layers are skipped
    assert all(hashable_weight(model.get_submodule(p)) is None for p in paths if "language_model" in p)


@pytest.mark.parametrize("numel", [4096 * 11008, 2 ** 24 + 1, 5120 * 13824, 37, 1])
def test_sample_positions_stay_in_range_past_float32_precision(numel):
    # a LLaVA-7B MLP weight (45M elements): float32 linspace rounds its last position up to numel, an
    # out-of-bounds index that crashed saving the first 7B adapter on a GPU
    positions = sample_positions(numel)
    assert positions.dtype == torch.int64 and len(positions) == min(numel, SAMPLE_SIZE)
    assert positions[0] == 0 and positions[-1] == numel - 1 and (positions[1:] > positions[:-1]).all()


def test_weight_sample_reads_a_large_weight_at_its_last_element():
    weight = torch.zeros(4096 * 11008, dtype=torch.bfloat16)
    weight[-1] = 3.0
    sample = weight_sample(weight.view(11008, 4096))
    assert sample[0] == 0.0 and sample[-1] == 3.0
