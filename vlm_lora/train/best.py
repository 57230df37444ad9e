"""Keeping the best adapter during training, and evals that fail without losing what was trained."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vlm_lora.train import distributed
from vlm_lora.train.setup import TrainingError

log = logging.getLogger("vlm_lora")


@contextmanager
def eval_failure(what: str, adapter: Path, before) -> Iterator[None]:
    """An eval that crashes (a bad image, a kernel without CPU support) becomes one ``TrainingError`` saying
    where the trained adapter is; ``before()`` first saves what is not saved yet."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - whatever broke the eval, the trained weights are kept
        before()
        raise TrainingError(f"{what} failed ({type(error).__name__}: {error}); the trained adapter is saved in "
                            f"{adapter}: score it with `vlm-lora eval --model MODEL --adapter {adapter} --data EVAL "
                            f"--out DIR`") from error


def track_best(best: dict, scores: dict, metric: str, step: int, model, adapter_dir: Path, write_adapter) -> None:
    if metric not in scores:
        raise TrainingError(f"train.metric_for_best {metric!r} is not among the eval metrics {sorted(scores)}")
    value = scores[metric]
    lower_is_better = metric.endswith("loss")
    if best["value"] is None or (value < best["value"] if lower_is_better else value > best["value"]):
        best.update(value=value, step=step, state=distributed.snapshot_trainable(model))
        write_adapter(adapter_dir)  # collective: every rank tracks the same best
        log.info("step %d: new best %s %.4f -> %s", step, metric, value, adapter_dir)


def best_summary(best: dict) -> dict:
    return {"value": best["value"], "step": best["step"]}
