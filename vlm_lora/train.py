"""The fine-tuning loop behind ``vlm-lora finetune``.

load base -> plan -> (score base) -> apply adapters -> train -> save PEFT adapter -> score adapted.
Everything lands in ``output_dir``: ``adapter/``, ``metrics.jsonl``, ``loss.png``, ``eval.json``,
per-sample predictions, ``plan.txt`` and ``recipe.resolved.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlm_lora.adapter_io import save_adapter
from vlm_lora.data import CaptionCollator, CaptionDataset
from vlm_lora.evaluate import evaluate_captions, write_predictions
from vlm_lora.modeling import load_model_and_processor
from vlm_lora.planner import Plan, plan as make_plan
from vlm_lora.plotting import plot_loss
from vlm_lora.quantize import quantize_linears
from vlm_lora.recipe import Recipe

log = logging.getLogger("vlm_lora")
NO_DECAY = ("bias", "norm", "lora_magnitude")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, plan: Plan, base_lr: float, weight_decay: float,
                 loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Optimizer groups per (component, decay, LoRA+ B) triple.

    The component's lr comes from its policy, else ``base_lr``; norms, biases and DoRA magnitudes
    get no weight decay; with LoRA+ every ``lora_B`` gets ``ratio`` times its component's lr.
    """
    lrs = {c.component: c.policy.lr or base_lr for c in plan.components}
    groups: dict[tuple[str, bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = plan.component_of_param(name) or "other"
        decay = param.ndim >= 2 and not any(k in name.lower() for k in NO_DECAY)
        is_b = loraplus_lr_ratio is not None and ".lora_B." in name
        lr = lrs.get(component, base_lr) * (loraplus_lr_ratio if is_b else 1.0)
        group = groups.setdefault((component, decay, is_b), {
            "params": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0,
            "name": component + ("/lora_B" if is_b else "") + ("" if decay else "/no_decay")})
        group["params"].append(param)
    return list(groups.values())


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' paged AdamW (32-bit or 8-bit states)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes.optim as bnb_optim

    return {"paged_adamw": bnb_optim.PagedAdamW, "paged_adamw_8bit": bnb_optim.PagedAdamW8bit}[name](groups, lr=lr)


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0
    return factor


@torch.no_grad()
def eval_loss(model, loader, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def finetune(recipe: Recipe) -> dict:
    """Run a recipe end to end; returns the ``eval.json`` content."""
    cfg, started = recipe.train, time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    log.info("loading %s (%s) on %s", recipe.model.path, recipe.model.dtype, device)
    model, processor = load_model_and_processor(recipe.model.path, recipe.model.dtype, device)
    plan = make_plan(model, recipe.strategy, recipe.components)
    (out / "plan.txt").write_text(str(plan) + "\n")
    log.info("\n%s", plan)

    train_set = CaptionDataset(recipe.data.train, recipe.data.image_root)
    eval_set = CaptionDataset(recipe.data.eval, recipe.data.image_root) if recipe.data.eval else None
    collate = CaptionCollator(processor, recipe.data.prompt)
    gen_args = dict(prompt=recipe.data.prompt, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    results: dict = {}
    if eval_set is not None and cfg.eval_base:
        results["base"], rows = evaluate_captions(model, processor, eval_set, desc="scoring base", **gen_args)
        write_predictions(rows, out / "predictions_base.jsonl")
        log.info("base model on %s: %s", recipe.data.eval, _fmt(results["base"]))

    quant = recipe.model.quantization
    if quant.bits == 4:
        prefixes = plan.prefixes_of([c for c in quant.components if plan.mode_of(c) != "full"])
        n = len(quantize_linears(model, prefixes, quant.type, quant.double_quant, quant.compute_dtype))
        log.info("QLoRA: %d linears of %s in 4-bit %s (compute %s)", n, ", ".join(quant.components),
                 quant.type, quant.compute_dtype)
    plan.apply(model)
    model.train()
    groups = param_groups(model, plan, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    eval_loader = DataLoader(eval_set, batch_size=cfg.eval_batch_size, collate_fn=collate) if eval_set else None
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps))
    trainable = [p for g in groups for p in g["params"]]

    metrics_file = (out / "metrics.jsonl").open("w")
    step, micro, window_loss, window_samples, window_start = 0, 0, 0.0, 0, time.time()
    bar = tqdm(total=total_steps, desc="finetune", unit="step")
    while step < total_steps:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            window_loss += loss.item() / cfg.grad_accum
            window_samples += batch["input_ids"].shape[0]
            micro += 1
            if micro % cfg.grad_accum:
                continue
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_steps == 0 or step == total_steps:
                n_steps = cfg.log_steps if step % cfg.log_steps == 0 else step % cfg.log_steps
                row = {"step": step, "epoch": round(micro / len(loader), 3), "loss": window_loss / n_steps,
                       "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": window_samples / (time.time() - window_start)}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.1f}")
                window_loss, window_samples, window_start = 0.0, 0, time.time()
            if eval_loader is not None and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == total_steps):
                metrics_file.write(json.dumps({"step": step, "eval_loss": eval_loss(model, eval_loader, device)}) + "\n")
                metrics_file.flush()
                plot_loss(out / "metrics.jsonl", out / "loss.png")
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                save_adapter(model, out / f"checkpoint-{step}", recipe.model.path, plan.full_prefixes(),
                             never_saved=plan.frozen_paths, extra_meta=_adapter_meta(recipe))
            if step >= total_steps:
                break
    bar.close()
    metrics_file.close()
    model.eval()
    adapter_dir = save_adapter(model, out / "adapter", recipe.model.path, plan.full_prefixes(),
                               never_saved=plan.frozen_paths, extra_meta=_adapter_meta(recipe))
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    train_time = time.time() - started

    if eval_set is not None:
        results["adapted"], rows = evaluate_captions(model, processor, eval_set, desc="scoring adapted", **gen_args)
        write_predictions(rows, out / "predictions_adapted.jsonl")
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    _summary(out, adapter_dir, results, train_time, time.time() - started, step)
    return results


def _adapter_meta(recipe: Recipe) -> dict:
    """What a later merge needs to know: the 4-bit layout the adapter was trained on."""
    quant = recipe.model.quantization
    return {"quantization": quant.model_dump() if quant.bits == 4 else None}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _summary(out: Path, adapter_dir: Path, results: dict, train_time: float, total_time: float, steps: int) -> None:
    lines = [f"done: {steps} steps in {train_time:.0f}s (total {total_time:.0f}s)",
             f"adapter (PEFT format): {adapter_dir}", f"loss curve: {out / 'loss.png'}"]
    for name in ("base", "adapted"):
        if name in results:
            lines.append(f"{name:>8}: {_fmt(results[name])}")
    if results:
        lines.append(f"eval: {out / 'eval.json'}")
    log.info("\n" + "\n".join(lines))
