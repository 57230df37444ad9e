"""The run folder (``output_dir``): whose run it holds, what ``--resume`` may continue, what
``--overwrite`` clears.

A folder that holds a run (checkpoints, ``recipe.resolved.yaml``, an adapter, ``eval.json``) is
refused without ``--resume`` or ``--overwrite``: a new run would otherwise mix its checkpoints with
the old ones (``save_total_limit`` deletes the newer by step) and a later ``--resume`` would continue
the other run's weights. ``--resume`` continues only the same recipe: step count and output options
may change (``RESUMABLE_KEYS``), anything else is refused by name. ``--overwrite`` removes the old
run's files first.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from vlm_lora.recipe import Recipe
from vlm_lora.train.checkpoint import list_checkpoints, usable_checkpoint
from vlm_lora.train.setup import RunExistsError, TrainingError

log = logging.getLogger("vlm_lora")

RECIPE_NAME = "recipe.resolved.yaml"
# keys a resumed run may change: how far it trains and what it writes (data loading options give the same batches)
RESUMABLE_KEYS = ("output_dir", "train.max_steps", "train.epochs", "train.save_steps", "train.save_total_limit",
                  "train.log_steps", "train.tensorboard", "data.num_workers", "data.prefetch_factor")
# what a run writes; --overwrite removes these (and checkpoint-*) before the new run starts
RUN_FILES = ("adapter", "adapter_last", "eval.json", "eval_base.json", "metrics.jsonl", "loss.png", "plan.txt",
             "predictions_base.jsonl", "predictions_adapted.jsonl", "tensorboard", RECIPE_NAME)


def held_run(out: Path) -> list[str]:
    """What in ``out`` belongs to an earlier run (empty: the folder is free)."""
    if not out.is_dir():
        return []
    found = [name for name in (RECIPE_NAME, "adapter", "adapter_last", "eval.json") if (out / name).exists()]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    return found + (checkpoints[:3] + [f"{len(checkpoints) - 3} more checkpoints"] if len(checkpoints) > 3
                    else checkpoints)


def resume_point(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to continue from (``--resume``), or None for a fresh run; raises ``RunExistsError``
    for a folder holding another run, or a ``--resume`` whose recipe differs from the run's."""
    if resume:
        if not list_checkpoints(out):
            raise RunExistsError(f"--resume: no checkpoint in {out} (checkpoints are written every train.save_steps)")
        check_same_recipe(out, recipe)
        try:
            return usable_checkpoint(out)
        except ValueError as error:
            raise RunExistsError(str(error)) from None
    held = held_run(out)
    if held and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({', '.join(held)}); pass --overwrite to replace it, "
                             f"--resume to continue it, or set output_dir")
    return None


def check_same_recipe(out: Path, recipe: Recipe) -> None:
    """Refuse ``--resume`` under a recipe that differs from the run's in more than ``RESUMABLE_KEYS``."""
    saved = out / RECIPE_NAME
    if not saved.is_file():
        log.warning("--resume: %s has no %s; cannot check that the recipe is the one it was trained with", out,
                    RECIPE_NAME)
        return
    before = _flat(yaml.safe_load(saved.read_text()) or {})
    now = _flat(recipe.model_dump(mode="json"))
    differ = sorted(key for key in before.keys() | now.keys()
                    if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_KEYS))
    if differ:
        shown = "; ".join(f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in differ[:10])
        more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
        raise RunExistsError(f"--resume: the recipe differs from the run in {out} ({RECIPE_NAME}) in {shown}{more}; "
                             f"a resumed run may change only {', '.join(RESUMABLE_KEYS)}. Use the run's recipe, or "
                             f"start a new run (another output_dir, or --overwrite)")


def _flat(tree, prefix: str = "") -> dict:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_writable(out: Path, rank: int = 0) -> None:
    """Create ``out`` and write a file there (every process, before any work); one clear error if it cannot."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".vlm_lora_write_test_{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"output_dir {out}: cannot write there ({error.strerror or error}); set output_dir to a "
                            f"writable folder") from None


def prepare_output_dir(out: Path, recipe_yaml: str, clear: bool) -> None:
    """(Main process) clear an old run's files when ``clear`` (``--overwrite``) and write ``recipe.resolved.yaml``."""
    check_writable(out)
    if clear:
        for path in [*out.glob("checkpoint-*"), *out.glob(".tmp-checkpoint-*"), *(out / n for n in RUN_FILES)]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (out / RECIPE_NAME).write_text(recipe_yaml)
