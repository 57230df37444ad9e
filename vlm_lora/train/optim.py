"""Optimizer and learning-rate schedule; the run's data order lives in ``vlm_lora.data.loader`` (re-exported)."""

from __future__ import annotations

import math

import torch

from vlm_lora.data.loader import BatchStream, micro_batches  # noqa: F401  (the data order, importable from here)
from vlm_lora.planner import Plan

NO_DECAY = ("bias", "norm", "lora_magnitude")


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
    if name == "adamw":  # the fused CUDA kernel updates all (many, small) LoRA tensors at once
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, fused=on_cuda or None)
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
