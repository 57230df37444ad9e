"""DyLoRA: sampled truncation in training, any rank K <= r afterwards, rank-K adapters PEFT loads."""

import copy
import json

import pytest
import torch

import vlm_lora
from conftest import ASSET_DATA, ASSET_MODEL, randomize_adapters
from vlm_lora.adapters.peft_format import AdapterError
from vlm_lora.lora import iter_lora_layers, unload_lora
from vlm_lora.lora.dylora import set_rank
from vlm_lora.lora.hooks import attach_step_hooks

peft = pytest.importorskip("peft")


def _dylora(model, rank=4):
    plan = vlm_lora.plan(model, "language_only", language_decoder={"variant": "dylora", "rank": rank})
    plan.apply(model)
    return plan


def test_training_steps_use_a_sampled_prefix_of_the_ranks(tiny_llava, tiny_batch):
    _dylora(tiny_llava, rank=6)
    randomize_adapters(tiny_llava)
    optimizer = torch.optim.SGD([p for p in tiny_llava.parameters() if p.requires_grad], lr=0.0)
    attach_step_hooks(tiny_llava, optimizer, 0, 10)
    tiny_llava.train()
    seen = set()
    for _ in range(6):
        layers = [layer for _, layer in iter_lora_layers(tiny_llava)]
        sample = layers[0].dylora_sample["default"]
        assert all(layer.dylora_sample["default"] == sample for layer in layers)  # one b per step
        seen.add(sample)
        tiny_llava(**tiny_batch, labels=tiny_batch["input_ids"]).loss.backward()
        for layer in layers:  # only the first b components get gradients
            grad_a = layer.lora_A["default"].weight.grad
            assert grad_a[:sample].abs().sum() > 0 and (sample == 6 or grad_a[sample:].abs().sum() == 0)
        optimizer.step()
        optimizer.zero_grad()
    assert len(seen) > 1 and seen <= set(range(1, 7))
    tiny_llava.eval()  # eval mode uses the chosen K (default: the full rank)
    assert all(layer.variants["default"].rank(layer, "default") == 6 for _, layer in iter_lora_layers(tiny_llava))


def test_rank_k_adapter_loads_in_peft_and_merges(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = _dylora(tiny_llava, rank=4)
    randomize_adapters(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path / "full", "tiny", plan.full_prefixes())
    with torch.no_grad():
        full = tiny_llava(**tiny_batch).logits
        assert set_rank(tiny_llava, 2) == len(plan.adapter_specs())
        at_k = tiny_llava(**tiny_batch).logits
    assert (full - at_k).abs().max() > 1e-3
    # rank K by hand: alpha / K times the first K components
    layer = next(layer for _, layer in iter_lora_layers(tiny_llava))
    a, b = layer.lora_A["default"].weight[:2], layer.lora_B["default"].weight[:, :2]
    torch.testing.assert_close(layer.delta_weight("default"), (b @ a) * layer.specs["default"].alpha / 2)

    vlm_lora.save_adapter(tiny_llava, tmp_path / "k2", "tiny", plan.full_prefixes())
    config = json.loads((tmp_path / "k2" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "k2").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**tiny_batch).logits, at_k, atol=1e-4, rtol=0)

    # the full adapter loaded with rank=2 is the same model; merged, still the same
    reloaded = copy.deepcopy(base)
    vlm_lora.load_adapter(reloaded, tmp_path / "full", rank=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_batch).logits, at_k, atol=1e-5, rtol=0)
        unload_lora(reloaded, merge=True)
        torch.testing.assert_close(reloaded(**tiny_batch).logits, at_k, atol=1e-4, rtol=0)
    with pytest.raises(AdapterError, match="rank 4; choose 1..4"):
        vlm_lora.load_adapter(copy.deepcopy(base), tmp_path / "full", rank=5)


def test_rank_on_a_plain_lora_adapter_is_a_clear_error(tiny_llava, tmp_path):
    base = copy.deepcopy(tiny_llava)
    vlm_lora.plan(tiny_llava, "language_only").apply(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", [])
    with pytest.raises(AdapterError, match="not a DyLoRA adapter"):
        vlm_lora.load_adapter(base, tmp_path, rank=2)


def test_export_cli_writes_a_rank_k_lora(tmp_path):
    from vlm_lora.cli import main
    from vlm_lora.modeling import load_model_and_processor

    model, _ = load_model_and_processor(str(ASSET_MODEL))
    plan = _dylora(model, rank=4)
    randomize_adapters(model)
    vlm_lora.save_adapter(model, tmp_path / "full", str(ASSET_MODEL), plan.full_prefixes())
    assert main(["export", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "full"), "--rank", "3",
                 "--out", str(tmp_path / "k3")]) == 0
    config = json.loads((tmp_path / "k3" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["modules_to_save"] == ["model.multi_modal_projector"]
    assert main(["merge", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "full"), "--rank", "3",
                 "--out", str(tmp_path / "merged3")]) == 0
    from vlm_lora.adapters.merge import _probe_logits

    merged, processor = load_model_and_processor(str(tmp_path / "merged3"))
    at_3, _ = load_model_and_processor(str(ASSET_MODEL))
    vlm_lora.load_adapter(at_3, tmp_path / "k3")
    with torch.no_grad():
        torch.testing.assert_close(_probe_logits(merged, processor), _probe_logits(at_3, processor), atol=1e-4, rtol=0)
    assert main(["export", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "full"), "--rank", "9",
                 "--out", str(tmp_path / "k9")]) == 2
    # eval scores several ranks of one DyLoRA adapter in one table; rank 3 is the exported rank-3 LoRA
    rows = [json.loads(line) for line in (ASSET_DATA / "microscopy" / "eval.jsonl").read_text().splitlines()[:2]]
    for row in rows:
        row["image"] = str(ASSET_DATA / "microscopy" / row["image"])
    (tmp_path / "gt.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--data", str(tmp_path / "gt.jsonl"), "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(["eval", "--model", str(ASSET_MODEL), "--adapter", str(tmp_path / "full"), "--rank", "1,5",
                 *common, "--out", str(tmp_path / "eval")]) == 2  # rank 5 > r = 4
    assert main(["eval", "--model", str(ASSET_MODEL), "--adapter", str(tmp_path / "full"), "--names", "dy",
                 "--rank", "1,3", *common, "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"base", "dy@r1", "dy@r3"} <= set(summary)
    assert main(["eval", "--model", str(ASSET_MODEL), "--adapter", str(tmp_path / "k3"), *common,
                 "--out", str(tmp_path / "k3.json")]) == 0
    assert json.loads((tmp_path / "k3.json").read_text())["cider"] == summary["dy@r3"]["cider"]
