"""What a run needs before its first step: the model for a recipe, the task, the data sets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlm_lora.modeling import load_model_and_processor, model_source
from vlm_lora.recipe import Recipe


log = logging.getLogger("vlm_lora")


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


def _load_data(recipe: Recipe, path: str, streaming="auto", split: str | None = None):
    from vlm_lora.data.datasets import load_dataset

    data = recipe.data
    return load_dataset(path, format=data.format, image_root=data.image_root, prompt=data.prompt,
                        on_bad_sample=data.on_bad_sample, label_key=data.label_key, split=split or data.split,
                        streaming=data.streaming if streaming == "auto" else streaming)


def eval_split(recipe: Recipe) -> str:
    """The split ``data.eval`` is read from: ``data.eval_split``, else ``validation``, else ``test`` (HF datasets
    with splits); refuses an eval that resolves to the training rows, naming both keys."""
    from vlm_lora.data.datasets import DataError
    from vlm_lora.data.sources import split_names

    data = recipe.data
    same = _same_source(data.train, data.eval)
    if data.eval_split and not same:  # nothing to resolve: no split listing (a hub id may be offline)
        return data.eval_split
    names = split_names(data.eval, data.format)
    split = data.eval_split or next((s for s in ("validation", "test") if names and s in names), None)
    if names is not None and split is None:
        raise DataError(f"data.eval {data.eval}: no validation or test split (splits: {', '.join(names)}); set "
                        f"data.eval_split")
    if same and (names is None or split == data.split):
        where = f" split {split!r}" if names is not None else ""
        raise DataError(f"data.eval ({data.eval}{where}, data.eval_split) is the training data, data.train "
                        f"({data.train}{where}, data.split): the run would be scored on the rows it trains on. "
                        f"Point data.eval at held-out rows" + (" or set data.eval_split" if names else ""))
    return split or data.split


def _same_source(a: str, b: str) -> bool:
    local = lambda p: "://" not in p and not p.startswith("hf:") and not any(c in p for c in "*?{")
    return Path(a).resolve() == Path(b).resolve() if local(a) and local(b) else a == b


def load_for_recipe(recipe: Recipe, device):
    """(model, processor) for the recipe; timm classifiers get a head sized to the training labels."""
    num_classes = None
    if model_source(recipe.model.path) == "timm":
        from vlm_lora.train.tasks import classes_of

        num_classes = len(classes_of(_load_data(recipe, recipe.data.train, streaming=False)))
    model, processor = load_model_and_processor(recipe.model.path, recipe.model.dtype, device,
                                                num_classes=num_classes, trust_remote_code=recipe.model.trust_remote_code,
                                                allow_pickle=recipe.model.allow_pickle)
    from vlm_lora.train.pixels import apply_pixel_budget

    apply_pixel_budget(recipe, model, processor)  # data.min_pixels / max_pixels onto the processor
    return model, processor


def build_task_and_data(recipe: Recipe, model, processor):
    """(task, train set, eval set or None) for the recipe's model."""
    from vlm_lora.architectures.registry import detect_architecture
    from vlm_lora.train.tasks import CaptionTask, ClassificationTask, ContrastiveTask, classes_of

    train_set = _load_data(recipe, recipe.data.train)
    eval_set = (_load_data(recipe, recipe.data.eval, streaming=False, split=eval_split(recipe))  # shards indexed
                if recipe.data.eval else None)
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
    if kind == "caption" and hasattr(train_set, "examples"):
        from vlm_lora.train.pixels import report_image_tokens

        line = report_image_tokens(recipe, processor, train_set)
        if line:
            log.info("%s", line)
    metric, valid = recipe.train.metric_for_best, (*task.metric_names, "eval_loss")
    if eval_set is not None and metric and metric not in valid:  # before the base eval and any training
        what = f"data.task {recipe.data.task!r}" if kind == "caption" else f"the {task.name} task of this model"
        raise TrainingError(f"train.metric_for_best {metric!r} is not a metric of {what}; valid: {', '.join(valid)}")
    if kind == "caption" and eval_set is not None:
        from vlm_lora.eval.tasks import check_task_rows

        if recipe.data.task != "caption":  # vqa/choice rows: answers (and options) before training
            check_task_rows(eval_set, recipe.data.task)
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
