"""VeRA against PEFT: same shared projections from the same key, same outputs, files PEFT loads."""

import copy
import json

import pytest
import torch
from torch import nn

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.lora import AdapterSpec, inject_lora, unload_lora

peft = pytest.importorskip("peft")


def test_vera_layers_match_peft_projection_forward_and_merge():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 28))
    ours = copy.deepcopy(base)
    inject_lora(ours, {"0": AdapterSpec(rank=4, alpha=8, variant="vera"), "2": AdapterSpec(rank=4, alpha=8, variant="vera")})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=["0", "2"]))
    # the shared pair comes from the same key with the same draw, sized to the largest shape
    torch.testing.assert_close(ours[0].vera_projection["default"].A, theirs.base_model.vera_A["default"])
    torch.testing.assert_close(ours[2].vera_projection["default"].B, theirs.base_model.vera_B["default"])
    assert ours[0].vera_projection["default"] is ours[2].vera_projection["default"]
    with torch.no_grad():
        for i in (0, 2):
            ours[i].vera_lambda_b["default"].normal_()
            ours[i].vera_lambda_d["default"].normal_()
            inner = theirs.base_model.model[i]
            inner.vera_lambda_b["default"].copy_(ours[i].vera_lambda_b["default"])
            inner.vera_lambda_d["default"].copy_(ours[i].vera_lambda_d["default"])
    x = torch.randn(5, 24)
    out = ours(x)
    # ours folds d and b into the pair before the matmuls, PEFT scales after them: fp32 rounding apart
    torch.testing.assert_close(out, theirs(x), atol=1e-6, rtol=1e-6)
    assert (out - base(x)).abs().max() > 1e-3
    ours[0].merge(), ours[2].merge()
    torch.testing.assert_close(ours(x), out, atol=1e-5, rtol=0)
    params = [n for n, p in ours.named_parameters() if "vera" in n]
    assert sorted(params) == ["0.vera_lambda_b.default", "0.vera_lambda_d.default",
                              "2.vera_lambda_b.default", "2.vera_lambda_d.default"]


@pytest.mark.parametrize("vision", ["frozen", "lora"])
def test_vera_adapter_loads_in_peft_and_merges(tiny_llava, tiny_batch, tmp_path, vision):
    base = copy.deepcopy(tiny_llava)
    strategy = "both" if vision == "lora" else "language_only"
    plan = vlm_lora.plan(tiny_llava, strategy, language_decoder={"variant": "vera", "rank": 4},
                         **({"vision_encoder": {"rank": 2}} if vision == "lora" else {}))
    decoder = next(c for c in plan.components if c.component == "language_decoder")
    n_layers = len(decoder.lora_paths)
    assert decoder.trainable_params == 4 * n_layers + sum(
        tiny_llava.get_submodule(p).out_features for p in decoder.lora_paths)
    plan.apply(tiny_llava)
    assert sum(p.numel() for n, p in tiny_llava.named_parameters()
               if p.requires_grad and "language_model" in n) == decoder.trainable_params
    randomize_adapters(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # all-VeRA: PEFT's VeRA format with the projections; mixed with LoRA: exact LoRA equivalents
    assert config["peft_type"] == ("LORA" if vision == "lora" else "VERA")
    if vision == "frozen":
        assert config["save_projection"] and config["projection_prng_key"] == 0
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
        assert (ours - base(**tiny_batch).logits).abs().max() > 1e-3
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs_model(**tiny_batch).logits, ours, atol=1e-4, rtol=0)
    reloaded = copy.deepcopy(base)  # vlm-lora loads it back (as the equivalent LoRA) and merges it
    vlm_lora.load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-4, rtol=0)
        unload_lora(reloaded, merge=True)
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-4, rtol=0)


def test_vera_grads_reach_only_the_scaling_vectors(tiny_llava, tiny_batch):
    vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "vera", "rank": 4}).apply(tiny_llava)
    tiny_llava(**tiny_batch, labels=tiny_batch["input_ids"]).loss.backward()
    trained = {n for n, p in tiny_llava.named_parameters() if p.grad is not None}
    assert trained and all("vera_lambda" in n or "multi_modal_projector" in n for n in trained)
    assert any("vera_lambda_b" in n for n in trained)


def test_adapter_arithmetic_reads_vera_files_as_their_lora_equivalent(tiny_llava, tmp_path):
    from vlm_lora.adapters.merge import adapter_deltas
    from vlm_lora.lora import iter_lora_layers

    base = copy.deepcopy(tiny_llava)
    vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "vera", "rank": 4}).apply(tiny_llava)
    randomize_adapters(tiny_llava)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", [])
    parts = adapter_deltas(base, tmp_path)
    for path, layer in iter_lora_layers(tiny_llava):
        torch.testing.assert_close(parts[f"{path}.weight"].to_dense(), layer.delta_weight("default"))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def _plain_vera_add(self, layer, name, x, base_out):  # PEFT's sequence: ((x A_s^T) d) B_s^T b
    return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)


def test_the_folded_vera_node_equals_the_plain_product(tiny_llava, tiny_batch, monkeypatch):
    """add_to folds d and b into a LoRA pair and runs the LoRA node: same loss and gradients as PEFT's
    sequence of products."""
    from vlm_lora.lora.vera import VeraVariant

    vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "vera", "rank": 8}).apply(tiny_llava)
    with torch.no_grad():
        for name, param in tiny_llava.named_parameters():
            if "vera_lambda" in name:
                param.normal_()
    plain = copy.deepcopy(tiny_llava)
    results = {}
    for label, model in (("folded", tiny_llava), ("plain", plain)):
        if label == "plain":
            monkeypatch.setattr(VeraVariant, "add_to", _plain_vera_add)
        loss = model(**tiny_batch, labels=tiny_batch["input_ids"]).loss
        loss.backward()
        results[label] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["folded"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    assert results["folded"][1].keys() == results["plain"][1].keys()
    assert any("vera_lambda_b" in n for n in results["folded"][1])
    for name, grad in results["folded"][1].items():
        torch.testing.assert_close(grad, results["plain"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_folded_vera_node_keeps_no_tokens_by_out_activation(monkeypatch):
    """For b's gradient the plain sequence keeps ``(x A_s^T d) B_s^T`` [tokens, out] in every layer; the
    folded node keeps x and [tokens, r]. 512 tokens, out 96, r 4: the saved bytes must drop by most of
    that [512, 96] fp32 tensor (196 KB)."""
    from vlm_lora.lora.vera import VeraVariant

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 96))
    inject_lora(layer, {"0": AdapterSpec(rank=4, alpha=8, variant="vera")})
    x = torch.randn(512, 64, requires_grad=True)
    folded = _saved_bytes(lambda: layer(x))
    monkeypatch.setattr(VeraVariant, "add_to", _plain_vera_add)
    plain = _saved_bytes(lambda: layer(x))
    assert plain - folded > 0.8 * 512 * 96 * 4, (plain, folded)
