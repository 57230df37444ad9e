"""AdaLoRA against PEFT: the same budget schedule and masks from the same gradients, the same
regularizer, and adapters PEFT loads (pruned per rank_pattern) with equal logits."""

import copy
import json

import pytest
import torch
from torch import nn

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.lora import AdapterSpec, inject_lora, iter_lora_layers, unload_lora
from vlm_lora.lora.adalora import adalora_layers, final_ranks, orthogonality_loss
from vlm_lora.lora.hooks import attach_step_hooks

peft = pytest.importorskip("peft")
BUDGET = {"target_r": 2, "tinit": 1, "tfinal": 2, "delta_t": 1, "orth_reg_weight": 0.0}


def test_budget_schedule_and_masks_follow_peft_to_the_target_budget():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    total = 8
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=total, lora_alpha=8, orth_reg_weight=0.0,
        target_modules=["0", "2"]))
    ours = copy.deepcopy(base)
    spec = AdapterSpec(rank=4, alpha=8, variant="adalora", extra=tuple(BUDGET.items()))
    inject_lora(ours, {"0": spec, "2": spec})
    with torch.no_grad():
        for i in (0, 2):
            inner = theirs.base_model.model[i]
            nn.init.normal_(inner.lora_E["default"], std=0.1)
            ours[i].lora_A["default"].weight.copy_(inner.lora_A["default"])
            ours[i].lora_B["default"].weight.copy_(inner.lora_B["default"])
            ours[i].lora_E["default"].copy_(inner.lora_E["default"])
    ours_params = [p for n, p in ours.named_parameters() if "lora_" in n]
    theirs_params = [p for n, p in theirs.named_parameters() if "lora_" in n]
    assert len(ours_params) == len(theirs_params) == 6
    opt_ours, opt_theirs = torch.optim.SGD(ours_params, lr=0.5), torch.optim.SGD(theirs_params, lr=0.5)
    attach_step_hooks(ours, opt_ours, 0, total)
    g = torch.Generator().manual_seed(1)
    for step in range(total):
        x = torch.randn(16, 12, generator=g)
        target = torch.randn(16, 8, generator=g)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            (model(x) - target).square().mean().backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        for i in (0, 2):
            torch.testing.assert_close(ours[i].lora_E["default"], theirs.base_model.model[i].lora_E["default"],
                                       atol=1e-5, rtol=1e-4)
    pattern = theirs.peft_config["default"].rank_pattern
    assert final_ranks(ours) == {"0": sum(pattern["0.lora_E.default"]), "2": sum(pattern["2.lora_E.default"])}
    assert sum(final_ranks(ours).values()) == 2 * 2  # target_r per module


def test_adalora_adapter_loads_in_peft_and_merges(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = vlm_lora.plan(tiny_llava, "language_only",
                         language_decoder={"variant": "adalora", "rank": 4, "adalora": {"target_r": 2}})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava)
    # before any pruning: the regularizer is PEFT's (PEFT adds orth_reg_weight * it to the loss)
    vlm_lora.save_adapter(tiny_llava, tmp_path / "unpruned", "tiny", plan.full_prefixes())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "unpruned", is_trainable=True)
    with torch.no_grad():
        labels = tiny_batch["input_ids"]
        peft_loss = theirs.base_model(**tiny_batch, labels=labels).loss  # AdaLoraModel.forward adds it
        our_loss = tiny_llava(**tiny_batch, labels=labels).loss
        torch.testing.assert_close(peft_loss, our_loss + 0.5 * orthogonality_loss(tiny_llava), atol=1e-5, rtol=0)
    for i, (_, layer) in enumerate(iter_lora_layers(tiny_llava)):  # prune like an allocation would
        mask = torch.tensor([True, i % 2 == 0, i % 3 == 0, False])
        layer.adalora_mask["default"] = mask
        with torch.no_grad():
            layer.lora_E["default"].masked_fill_(~mask[:, None], 0.0)
    vlm_lora.save_adapter(tiny_llava, tmp_path / "pruned", "tiny", plan.full_prefixes())
    config = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    assert sum(map(sum, config["rank_pattern"].values())) == sum(final_ranks(tiny_llava).values())
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
        assert (ours - base(**tiny_batch).logits).abs().max() > 1e-3
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pruned").eval()
        torch.testing.assert_close(theirs(**tiny_batch).logits, ours, atol=1e-4, rtol=0)
        reloaded = copy.deepcopy(base)
        vlm_lora.load_adapter(reloaded, tmp_path / "pruned")
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-4, rtol=0)
        unload_lora(reloaded, merge=True)
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-4, rtol=0)


def test_orthogonality_gradient_is_added_before_the_step(tiny_llava, tiny_batch):
    vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "adalora", "rank": 4}).apply(tiny_llava)
    params = [p for p in tiny_llava.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    attach_step_hooks(tiny_llava, optimizer, 0, 4)
    (0.5 * orthogonality_loss(tiny_llava)).backward()
    expected = {n: p.grad.clone() for n, p in tiny_llava.named_parameters() if p.grad is not None}
    optimizer.zero_grad()
    for p in params:  # one step with no loss gradient: the hook supplies the regularizer's
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in tiny_llava.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name])


def test_finetune_ends_at_the_target_budget(tmp_path):
    import yaml

    from conftest import ASSET_DATA, ASSET_MODEL
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import finetune

    recipe = yaml.safe_load((ASSET_MODEL.parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(ASSET_DATA / "microscopy" / "train.jsonl")}
    recipe["components"] = {"language_decoder": {"variant": "adalora", "rank": 4, "targets": ["q", "v"],
                                                 "adalora": {"target_r": 2, "tinit": 1, "tfinal": 1}}}
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    finetune(load_recipe(tmp_path / "r.yaml", ["train.max_steps=5", "train.batch_size=2"]))
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 5
    assert sum(kept) == 2 * len(kept) and len(kept) > 0
    note = (tmp_path / "run" / "plan.txt").read_text()
    assert f"adalora final ranks (total {sum(kept)} over {len(kept)} modules)" in note


def test_settings_a_variant_would_ignore_are_errors(tiny_llava):
    from vlm_lora.planner import PlanError

    with pytest.raises(PlanError, match="language_decoder.adalora: set only with variant adalora"):
        vlm_lora.plan(tiny_llava, "language_only", language_decoder={"adalora": {"target_r": 2}})
    with pytest.raises(PlanError, match="language_decoder.init: pissa does not apply to variant vera"):
        vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "vera", "init": "pissa"})


@pytest.mark.parametrize("decoder,vision", [("adalora", "frozen"), ("vera", "lora")])
def test_checkpoints_restore_the_trainable_state(tiny_llava, tiny_batch, tmp_path, decoder, vision):
    """PEFT's AdaLoRA files are pruned and mixed adapters hold LoRA equivalents: resuming reads
    vlm-lora's own copy of the VeRA/AdaLoRA state (vlm_lora_state.safetensors)."""
    from vlm_lora.train.checkpoint import restore_weights

    fresh = copy.deepcopy(tiny_llava)
    overrides = {"language_decoder": {"variant": decoder, "rank": 4}}
    if vision == "lora":
        overrides["vision_encoder"] = {"rank": 2}
    strategy = "both" if vision == "lora" else "language_only"
    plan = vlm_lora.plan(tiny_llava, strategy, **overrides)
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava)
    for _, layer in iter_lora_layers(tiny_llava):
        if decoder in getattr(layer, "variants", {}).get("default").name:
            if decoder == "adalora":
                layer.adalora_mask["default"] = torch.tensor([True, False, True, False])
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    assert (tmp_path / "vlm_lora_state.safetensors").is_file()
    vlm_lora.plan(fresh, strategy, **overrides).apply(fresh)
    restore_weights(fresh, tmp_path)
    trained = dict(tiny_llava.named_parameters())
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], msg=name)
    if decoder == "adalora":
        assert final_ranks(fresh) == final_ranks(tiny_llava)


def test_adalora_decoder_with_lora_vision_saves_one_peft_lora(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = vlm_lora.plan(tiny_llava, "both", vision_encoder={"rank": 2},
                         language_decoder={"variant": "adalora", "rank": 4, "adalora": {"target_r": 2}})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava)
    for _, layer in iter_lora_layers(tiny_llava):
        if "default" in getattr(layer, "adalora_mask", {}):
            layer.adalora_mask["default"] = torch.tensor([True, False, True, True])
            with torch.no_grad():
                layer.lora_E["default"][1] = 0.0
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and 3 in {config["r"], *config["rank_pattern"].values()}  # 3 kept
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(theirs(**tiny_batch).logits, tiny_llava(**tiny_batch).logits, atol=1e-4, rtol=0)


def test_a_schedule_longer_than_the_run_is_a_clear_error(tiny_llava):
    vlm_lora.plan(tiny_llava, "language_only", language_decoder={
        "variant": "adalora", "rank": 4, "adalora": {"tinit": 3, "tfinal": 2}}).apply(tiny_llava)
    optimizer = torch.optim.SGD([p for p in tiny_llava.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"tinit \(3\) \+ tfinal \(2\) .* run of 5 steps"):
        attach_step_hooks(tiny_llava, optimizer, 0, 5)


def test_the_batched_regularizer_equals_peft_per_matrix_formula(tiny_llava):
    """PEFT's regularizer is a loop over every P and Q; ours stacks layers of one shape: same value."""
    vlm_lora.plan(tiny_llava, "both", language_decoder={"variant": "adalora", "rank": 4},
                  vision_encoder={"variant": "adalora", "rank": 8}).apply(tiny_llava)
    with torch.no_grad():
        for _, layer, name in adalora_layers(tiny_llava):  # away from orthogonal, so every term differs
            layer.lora_A[name].weight.normal_(std=0.5)
            layer.lora_B[name].weight.normal_(std=0.5)
    terms = []
    for n, p in tiny_llava.named_parameters():  # PEFT AdaLoraModel.forward's loop
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.size()), p="fro"))
    shapes = {tuple(layer.lora_B[name].weight.shape) for _, layer, name in adalora_layers(tiny_llava)}
    assert len(shapes) > 1 and len(terms) > 2 * len(shapes)  # several groups, several layers per group
    torch.testing.assert_close(orthogonality_loss(tiny_llava), torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)
