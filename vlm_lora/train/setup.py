"""What a run needs before its first step: the model for a recipe, the task, the data sets."""

from __future__ import annotations

import os

from vlm_lora.modeling import load_model_and_processor, model_source
from vlm_lora.recipe import Recipe


class RunExistsError(ValueError):
    """output_dir already holds a finished run, or --resume found nothing to resume."""


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a missing metric); the message says what was kept."""


class Subset:
    """The first ``n`` examples of a data set, with the same interface."""

    def __init__(self, dataset, n: int):
        self.dataset, self.examples = dataset, dataset.examples[:n]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def subset(self, n: int) -> "Subset":
        return Subset(self.dataset, min(n, len(self.examples)))


def _load_data(recipe: Recipe, path: str, streaming="auto"):
    from vlm_lora.data.datasets import load_dataset

    data = recipe.data
    return load_dataset(path, format=data.format, image_root=data.image_root, prompt=data.prompt,
                        on_bad_sample=data.on_bad_sample, label_key=data.label_key, split=data.split,
                        streaming=data.streaming if streaming == "auto" else streaming)


def load_for_recipe(recipe: Recipe, device):
    """(model, processor) for the recipe; timm classifiers get a head sized to the training labels."""
    num_classes = None
    if model_source(recipe.model.path) == "timm":
        from vlm_lora.train.tasks import classes_of

        num_classes = len(classes_of(_load_data(recipe, recipe.data.train, streaming=False)))
    return load_model_and_processor(recipe.model.path, recipe.model.dtype, device, num_classes=num_classes,
                                    trust_remote_code=recipe.model.trust_remote_code)


def build_task_and_data(recipe: Recipe, model, processor):
    """(task, train set, eval set or None) for the recipe's model."""
    from vlm_lora.architectures.registry import detect_architecture
    from vlm_lora.train.tasks import CaptionTask, ClassificationTask, ContrastiveTask, classes_of

    train_set = _load_data(recipe, recipe.data.train)
    eval_set = _load_data(recipe, recipe.data.eval, streaming=False) if recipe.data.eval else None  # shards indexed
    kind = detect_architecture(model).task
    if kind == "classify":
        task = ClassificationTask(processor, classes_of(train_set), recipe)
    elif kind == "caption":
        task = CaptionTask(processor, recipe)
    elif kind == "contrastive":
        task = ContrastiveTask(processor, classes_of(train_set), recipe)
    else:
        raise TrainingError(f"vlm-lora finetune has no {kind!r} objective yet; plan and adapt the model through the "
                            f"Python API (vlm_lora.plan(model, ...).apply(model)) and train it in your own loop")
    text_only = [e.where for e in getattr(eval_set, "examples", []) if getattr(e, "text_only", False)]
    if text_only:  # eval captions images with the recipe's prompt: a text-only row has nothing to score
        from vlm_lora.data.formats import DataError

        raise DataError(f"{recipe.data.eval}: {len(text_only)} row(s) without an image ({', '.join(text_only[:5])}); "
                        f"eval captions images, so text-only rows belong in data.train")
    if kind == "caption":  # samples that cannot fit train.max_length: error or skip now, not mid-run
        for dataset in (train_set, eval_set):  # embedded images are not opened here: the collator finds those
            if dataset is not None and hasattr(dataset, "examples") and not dataset.embedded_images:
                task.collate.check_lengths(dataset)
    if eval_set is not None and not hasattr(eval_set, "subset"):
        eval_set.subset = lambda n, data=eval_set: Subset(data, n)
    return task, train_set, eval_set


def make_train_loader(recipe: Recipe, train_set, collate, accelerator):
    """The run's ``TrainLoader``: this process's micro-batches, loaded by ``data.num_workers`` workers."""
    import torch

    from vlm_lora.data.loader import TrainLoader, default_workers

    data, cfg = recipe.data, recipe.train
    world = accelerator.num_processes
    workers = data.num_workers if data.num_workers is not None else default_workers(
        int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return TrainLoader(train_set, collate, cfg.batch_size, cfg.seed, accelerator.process_index, world,
                       num_workers=workers, group_by_length=data.group_by_length, group=world * cfg.grad_accum,
                       pin_memory=torch.device(accelerator.device).type == "cuda", prefetch_factor=data.prefetch_factor)
