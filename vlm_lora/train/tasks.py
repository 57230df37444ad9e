"""Training objectives per architecture: captioning (LLaVA, BLIP-2) and classification (timm ViT).

A task turns data-set items into batches, computes the loss of a batch with the number of
units it averages over (answer tokens or images, so gradient accumulation can weight
micro-batches exactly), and evaluates a model on a data set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_lora.data.datasets import IGNORE_INDEX


class CaptionTask:
    """Next-token loss on the answer tokens; eval = greedy captions scored with BLEU/ROUGE-L/CIDEr-D."""

    name = "caption"
    default_metric = "cider"

    def __init__(self, processor, recipe):
        from vlm_lora.data.collate import make_collator

        self.processor = processor
        self.recipe = recipe
        self.collate = make_collator(processor, recipe)

    def count_units(self, batch: dict) -> int:
        """Answer tokens the loss averages over (labels are shifted by one inside the model)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(mean loss over answer tokens, number of answer tokens)."""
        return model(**batch).loss, self.count_units(batch)

    def evaluate(self, model, dataset, desc: str = "eval") -> tuple[dict, list[dict]]:
        from vlm_lora.eval.captioning import evaluate_captions

        cfg = self.recipe.train
        return evaluate_captions(model, self.processor, dataset, self.recipe.data.prompt, cfg.eval_batch_size,
                                 cfg.max_new_tokens, desc)

    def score(self, rows: list[dict]) -> dict:
        """Metrics of rows as ``evaluate`` returns them (e.g. gathered from several ranks)."""
        from vlm_lora.metrics import score_captions

        return score_captions([r["prediction"] for r in rows], [r["references"] for r in rows])


class ClassificationTask:
    """Cross-entropy over the classes found in the training labels; eval = accuracy."""

    name = "classify"
    default_metric = "accuracy"

    def __init__(self, data_config: dict, classes: list[str], recipe):
        import timm.data

        self.classes = classes
        self.index = {c: i for i, c in enumerate(classes)}
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.recipe = recipe

    def collate(self, items) -> dict:
        images = torch.stack([self.transform(image) for image, _ in items])
        labels = torch.tensor([self.index[str(example.label)] for _, example in items])
        return {"pixel_values": images, "labels": labels}

    def count_units(self, batch: dict) -> int:
        return batch["labels"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        logits = model(batch["pixel_values"])
        return F.cross_entropy(logits.float(), batch["labels"]), batch["labels"].numel()

    @torch.no_grad()
    def evaluate(self, model, dataset, desc: str = "eval") -> tuple[dict, list[dict]]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        rows, correct = [], 0
        size = self.recipe.train.eval_batch_size
        for start in range(0, len(dataset), size):
            batch = self.collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            predicted = model(batch["pixel_values"].to(device)).argmax(-1).cpu()
            correct += int((predicted == batch["labels"]).sum())
            for offset, p in enumerate(predicted.tolist()):
                example = dataset.examples[start + offset]
                rows.append({"image": str(example.image_path), "prediction": self.classes[p], "label": example.label})
        model.train(was_training)
        return {"accuracy": correct / len(dataset), "n": len(dataset)}, rows

    def score(self, rows: list[dict]) -> dict:
        """Metrics of rows as ``evaluate`` returns them (e.g. gathered from several ranks)."""
        correct = sum(r["prediction"] == str(r["label"]) for r in rows)
        return {"accuracy": correct / len(rows), "n": len(rows)}


def classes_of(dataset) -> list[str]:
    labels = [getattr(e, "label", None) for e in dataset.examples]
    if any(label is None for label in labels):
        raise ValueError("classification needs a label in every row (data.label_key)")
    return sorted({str(label) for label in labels})
