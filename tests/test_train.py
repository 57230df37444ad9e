"""Training on the embedded model: steps lower the loss; finetune writes every promised file."""

import json

import pytest
import torch
import yaml

from conftest import ASSET_DATA, ASSET_MODEL
from vlm_lora.data import CaptionCollator, CaptionDataset
from vlm_lora.modeling import load_model_and_processor
from vlm_lora.planner import plan
from vlm_lora.recipe import load_recipe
from vlm_lora.train import finetune
from vlm_lora.train.optim import param_groups


def test_a_few_lora_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model, processor = load_model_and_processor(str(ASSET_MODEL))
    data = CaptionDataset(ASSET_DATA / "microscopy" / "train.jsonl")
    batch = CaptionCollator(processor, "Describe the image.")([data[i] for i in range(8)])
    p = plan(model, "language_only", language_decoder={"rank": 8})
    p.apply(model)
    groups = param_groups(model, p, 2e-3, 0.0)
    frozen_before = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.clone()
    optimizer = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight, frozen_before)


def test_param_groups_follow_component_lr_and_skip_decay_on_biases(tiny_llava):
    p = plan(tiny_llava, "language_only", connector={"lr": 1e-3})
    p.apply(tiny_llava)
    groups = {g["name"]: g for g in param_groups(tiny_llava, p, 2e-4, 0.1)}
    assert groups["connector"]["lr"] == 1e-3 and groups["connector"]["weight_decay"] == 0.1
    assert groups["connector/no_decay"]["weight_decay"] == 0.0  # projector biases
    assert groups["language_decoder"]["lr"] == 2e-4
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in tiny_llava.parameters() if p.requires_grad)


@pytest.mark.slow
def test_finetune_writes_adapter_metrics_curve_and_eval(tmp_path):
    rows = [json.loads(l) for l in (ASSET_DATA / "microscopy" / "eval.jsonl").read_text().splitlines()[:6]]
    for row in rows:
        row["image"] = str(ASSET_DATA / "microscopy" / row["image"])
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe_file = tmp_path / "r.yaml"
    recipe = yaml.safe_load((ASSET_MODEL.parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(ASSET_DATA / "microscopy" / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")}
    recipe["output_dir"] = str(tmp_path / "run")
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = finetune(load_recipe(recipe_file, ["train.max_steps=6", "train.eval_steps=3", "train.log_steps=2",
                                                "train.save_steps=4", "train.max_new_tokens=8"]))
    run = tmp_path / "run"
    for name in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "eval.json", "predictions_base.jsonl", "predictions_adapted.jsonl", "plan.txt",
                 "recipe.resolved.yaml", "checkpoint-4/adapter_model.safetensors"]:
        assert (run / name).is_file(), name
    assert set(result) == {"base", "adapted"}
    for scores in result.values():
        assert {"bleu4", "cider", "rougeL", "n"} <= set(scores) and scores["n"] == 6
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [3, 6]
    evals = {m["step"]: m["eval_cider"] for m in metrics if "eval_cider" in m}
    best = max(evals, key=lambda s: (evals[s], -s))
    assert result["adapted"]["best_step"] == best  # adapter/ holds the best step's weights ...
    assert result["adapted"]["cider"] == pytest.approx(evals[best], abs=1e-9)  # ... and they were restored
    preds = [json.loads(l) for l in (run / "predictions_adapted.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all({"image", "prediction", "references"} <= set(p) for p in preds)


def test_warmup_then_cosine_and_linear_schedules():
    from vlm_lora.train.optim import lr_lambda

    cosine = lr_lambda("cosine", warmup=4, total=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(9) == pytest.approx(0.5)  # half-way through the decay
    assert cosine(14) == pytest.approx(0.0, abs=1e-12)
    linear = lr_lambda("linear", warmup=0, total=10)
    assert [round(linear(s), 3) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_lambda("constant", warmup=2, total=10)(7) == 1.0


def test_checkpoints_keep_only_the_newest(tmp_path):
    from vlm_lora.train.checkpoint import list_checkpoints, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (2, 4, 6, 8):
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "position": {"step": step}}
        save_checkpoint(tmp_path, step, lambda folder: folder.mkdir(parents=True), state, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically: no leftovers
