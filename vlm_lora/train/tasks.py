"""Training objectives per architecture: captioning (LLaVA, BLIP-2, ...), classification (timm ViT) and
image-text contrastive learning (open_clip).

A task turns data-set items into batches, computes the loss of a batch with the number of
units it averages over (answer tokens or images, so gradient accumulation can weight
micro-batches exactly), and evaluates a model on a data set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_lora.data.datasets import IGNORE_INDEX
from vlm_lora.data.labelled import LABELLED_POSITIONS
from vlm_lora.train.loss import labelled_token_loss, supports_labelled_head, training_kwargs


class CaptionTask:
    """Next-token loss on the answer tokens; eval = greedy captions scored with BLEU/ROUGE-L/CIDEr-D,
    or with ``data.task`` vqa / choice: each question answered and scored (``vlm_lora.eval.tasks``)."""

    name = "caption"

    def __init__(self, processor, recipe):
        from vlm_lora.data.collate import make_collator
        from vlm_lora.metrics.names import DEFAULT_METRIC, TASK_METRICS

        self.processor = processor
        self.recipe = recipe
        self.collate = make_collator(processor, recipe)
        self.eval_task = getattr(recipe.data, "task", "caption")
        self.default_metric = DEFAULT_METRIC[self.eval_task]
        self.metric_names = TASK_METRICS[self.eval_task]  # what ``evaluate`` scores

    def count_units(self, batch: dict) -> torch.Tensor:
        """Answer tokens the loss averages over (labels are shifted by one inside the model): a 0-d tensor on
        the batch's device, so that the training step need not wait for the GPU to count them."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over answer tokens, number of answer tokens as a 0-d tensor); ``lm_head`` sees only the answer
        positions when ``train.head_on_labels`` is on and the model's loss allows it (same loss)."""
        kwargs = {k: v for k, v in training_kwargs(model).items() if k not in batch}  # a packed batch sets its own
        if self.uses_labelled_head(model):
            return labelled_token_loss(model, batch, **kwargs), self.count_units(batch)
        inputs = {k: v for k, v in batch.items() if k != LABELLED_POSITIONS}
        return model(**inputs, **kwargs).loss, self.count_units(batch)

    def uses_labelled_head(self, model) -> bool:
        """Whether ``loss`` runs lm_head on the answer positions only (``train.head_on_labels``, model allows)."""
        cfg = self.recipe.train
        return cfg.head_on_labels and cfg.kernels != "liger_flce" and supports_labelled_head(model)

    def evaluate(self, model, dataset, desc: str = "eval") -> tuple[dict, list[dict]]:
        from vlm_lora.eval.captioning import evaluate_captions
        from vlm_lora.eval.tasks import evaluate_task

        cfg = self.recipe.train
        if self.eval_task != "caption":
            return evaluate_task(model, self.processor, dataset, self.eval_task, cfg.eval_batch_size,
                                 cfg.max_new_tokens, desc, chat_template=self.recipe.data.chat_template)
        return evaluate_captions(model, self.processor, dataset, self.recipe.data.prompt, cfg.eval_batch_size,
                                 cfg.max_new_tokens, desc, chat_template=self.recipe.data.chat_template)

    def score(self, rows: list[dict]) -> dict:
        """Metrics of rows as ``evaluate`` returns them (e.g. gathered from several ranks)."""
        from vlm_lora.eval.captioning import score_rows as score_caption_rows
        from vlm_lora.eval.tasks import score_rows

        if self.eval_task != "caption":
            return score_rows(self.eval_task, [r for r in rows if not r.get("skipped")])
        return score_caption_rows(rows)


class ClassificationTask:
    """Cross-entropy over the classes found in the training labels; eval = accuracy."""

    name = "classify"
    default_metric = "accuracy"
    metric_names = ("accuracy",)

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


class ContrastiveTask:
    """Symmetric image-text InfoNCE (CLIP's loss) over the batch with the model's own ``logit_scale``;
    eval = zero-shot classification accuracy: each image against one text per class.

    The texts are each sample's first caption; a class's text is ``data.prompt`` with ``{label}`` filled
    in when the prompt has that field, else ``"a photo of {label}."``.
    """

    name = "contrastive"
    default_metric = "accuracy"
    metric_names = ("accuracy",)
    CLASS_TEMPLATE = "a photo of {label}."

    def __init__(self, processor, classes: list[str], recipe):
        self.processor, self.classes, self.recipe = processor, classes, recipe
        self.index = {c: i for i, c in enumerate(classes)}
        prompt = recipe.data.prompt
        self.template = prompt if "{label}" in prompt else self.CLASS_TEMPLATE

    def collate(self, items) -> dict:
        """``pixel_values`` [B, 3, H, W], ``input_ids`` [B, context_length] (first captions)."""
        images = torch.stack([self.processor.preprocess(image) for image, _ in items])
        texts = self.processor.tokenizer([example.captions[0] for _, example in items])
        return {"pixel_values": images, "input_ids": texts}

    def count_units(self, batch: dict) -> int:
        return batch["pixel_values"].shape[0]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        image, text, scale = model(batch["pixel_values"], batch["input_ids"])[:3]  # normalized [B, D], exp(scale)
        logits = scale * image.float() @ text.float().T  # [B images, B texts]
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, logits.shape[0]

    @torch.no_grad()
    def evaluate(self, model, dataset, desc: str = "eval") -> tuple[dict, list[dict]]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompts = self.processor.tokenizer([self.template.format(label=c) for c in self.classes]).to(device)
        class_features = F.normalize(model.encode_text(prompts).float(), dim=-1)  # [C, D]
        rows, correct = [], 0
        size = self.recipe.train.eval_batch_size
        for start in range(0, len(dataset), size):
            items = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            images = torch.stack([self.processor.preprocess(image) for image, _ in items]).to(device)
            predicted = (F.normalize(model.encode_image(images).float(), dim=-1) @ class_features.T).argmax(-1)
            for (_, example), p in zip(items, predicted.tolist()):
                correct += self.classes[p] == str(example.label)
                rows.append({"image": str(example.image_path), "prediction": self.classes[p], "label": example.label})
        model.train(was_training)
        return {"accuracy": correct / len(dataset), "n": len(dataset)}, rows


def classes_of(dataset) -> list[str]:
    labels = [getattr(e, "label", None) for e in dataset.examples]
    if any(label is None for label in labels):
        raise ValueError("classification needs a label in every row (data.label_key)")
    return sorted({str(label) for label in labels})
