"""Per-step hooks of variants whose training changes with the step (DyLoRA's rank sample,
AdaLoRA's budget): ``attach_step_hooks`` wires them to the optimizer, so the training loop
needs one call and no knowledge of the variants.

A hook is ``hook(model, step, total_steps)``: ``BEFORE_STEP`` hooks run just before optimizer
step ``step`` (0-based, gradients present), ``STEP_HOOKS`` right after it (gradients still
present, before ``zero_grad``) with the number of steps done, and once at attach time with the
starting step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Hook = Callable[[nn.Module, int, int], None]
STEP_HOOKS: list[Hook] = []
BEFORE_STEP: list[Hook] = []


def attach_step_hooks(model: nn.Module, optimizer: torch.optim.Optimizer, start_step: int, total_steps: int) -> None:
    """Run the hooks for ``model`` around every ``optimizer.step()`` from ``start_step`` on."""
    state = {"step": start_step}

    def before(optimizer, args, kwargs):
        for hook in BEFORE_STEP:
            hook(model, state["step"], total_steps)

    def after(optimizer, args, kwargs):
        state["step"] += 1
        for hook in STEP_HOOKS:
            hook(model, state["step"], total_steps)

    for hook in STEP_HOOKS:
        hook(model, start_step, total_steps)
    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
