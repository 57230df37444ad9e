"""open_clip trains contrastively: the task's loss is open_clip's own ClipLoss, zero-shot accuracy is
recomputed here from the model's forward, and a short finetune lowers the loss and raises accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ASSET_DATA, REPO
from vlm_lora.architectures.tiny_models import save_tiny_open_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"))


def _recipe(tmp_path: Path, model_dir: Path, steps: int = 30):
    from vlm_lora.recipe import apply_overrides, validate_recipe

    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data = apply_overrides(data, [f"model.path={model_dir}", "strategy=both", "components.vision_encoder.mode=lora",
                                  "components.language_decoder.targets=[q,k,v,o,up,down]"])
    data["data"]["prompt"] = "{label} stain"
    data["train"].update(max_steps=steps, eval_steps=steps, save_steps=None, log_steps=1, eval_samples=None)
    data["output_dir"] = str(tmp_path / "run")
    return validate_recipe(data)


def test_loss_is_open_clips_clip_loss_and_accuracy_is_zero_shot(tiny_clip_dir, tmp_path, monkeypatch):
    from open_clip.loss import ClipLoss

    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.modeling import load_model_and_processor
    from vlm_lora.train.tasks import ContrastiveTask, classes_of

    monkeypatch.chdir(REPO)
    recipe = _recipe(tmp_path, tiny_clip_dir)
    model, processor = load_model_and_processor(str(tiny_clip_dir))
    data = load_dataset(str(ASSET_DATA / "microscopy" / "eval.jsonl"), prompt=recipe.data.prompt)
    data.examples = data.examples[:12]
    task = ContrastiveTask(processor, classes_of(data), recipe)
    batch = task.collate([data[i] for i in range(6)])
    with torch.no_grad():
        loss, n = task.loss(model, batch)
        image, text, scale = model(batch["pixel_values"], batch["input_ids"])[:3]
        reference = ClipLoss()(image, text, scale)
    assert n == 6 and torch.allclose(loss, reference, atol=1e-6)

    metrics, rows = task.evaluate(model, data)
    texts = processor.tokenizer([f"{c} stain" for c in task.classes])
    correct = 0
    with torch.no_grad():
        for i in range(len(data)):
            image, label = data[i][0], data.examples[i].label
            features, class_features, _ = model(processor.preprocess(image)[None], texts)[:3]
            correct += task.classes[int((features @ class_features.T).argmax())] == label
    assert metrics == {"accuracy": correct / len(data), "n": len(data)} and len(rows) == len(data)


@pytest.mark.slow
def test_open_clip_finetunes_contrastively(tiny_clip_dir, tmp_path, monkeypatch):
    from vlm_lora.train import finetune

    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread beats several on shared cores
    try:
        results = finetune(_recipe(tmp_path, tiny_clip_dir))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    print(f"open_clip: loss {losses[0]:.3f} -> {losses[-1]:.3f}; zero-shot accuracy "
          f"{results['base']['accuracy']:.2f} -> {results['adapted']['accuracy']:.2f}")
    assert results["adapted"]["accuracy"] > results["base"]["accuracy"]


def test_a_caption_metric_for_a_contrastive_model_fails_before_training(tiny_clip_dir, tmp_path, monkeypatch):
    """The recipe accepts cider (some task scores it), but this model's eval is zero-shot accuracy."""
    from vlm_lora.train import finetune
    from vlm_lora.train.setup import TrainingError

    monkeypatch.chdir(REPO)
    recipe = _recipe(tmp_path, tiny_clip_dir, steps=2)
    recipe.train.metric_for_best = "cider"
    with pytest.raises(TrainingError, match="'cider' is not a metric of the contrastive task of this model; "
                                            "valid: accuracy, eval_loss"):
        finetune(recipe)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained
