"""Divergence detection without a host sync per optimizer step.

Reading the loss (``.item()``) or a finite flag every step makes the host wait for the GPU to drain, and
the GPU then idles while the host fetches the next batch and launches the next forward. The guard keeps the
check on the device instead: each step records whether its loss and gradient norm were finite and, the
first time one was not, that step and its loss. ``check()`` reads this once, at the points where the loop
reads the device anyway or is about to write something: log steps, before an eval, before a checkpoint, at
the end.

Why the run stops as exactly as a per-step check would: finite gradients and a finite learning rate give
finite AdamW updates, so weights turn non-finite only after a step whose loss or gradients were not; the
error names that first step; and since every save and eval is preceded by a check, nothing computed after
it reaches the disk. The only difference is up to ``log_steps - 1`` extra (wasted) steps before the stop.
"""

from __future__ import annotations

import math

import torch

_NONE = torch.iinfo(torch.int64).max  # no bad step yet


class DivergenceGuard:
    """The first optimizer step (0-based) whose loss or gradient norm was not finite, kept on ``device``."""

    def __init__(self, device: torch.device | str):
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
        self.loss_at_first_bad = torch.zeros((), dtype=torch.float64, device=device)
        self.norm_at_first_bad = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """``loss``, ``grad_norm``: 0-d tensors of optimizer step ``step`` (0-based), global over processes;
        ``grad_norm`` None: the loss alone decides (fp16, where the loss scaler handles inf gradients)."""
        grad_norm = torch.zeros_like(loss) if grad_norm is None else grad_norm
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        first = bad & (self.first_bad == _NONE)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.loss_at_first_bad = torch.where(first, loss.double(), self.loss_at_first_bad)
        self.norm_at_first_bad = torch.where(first, grad_norm.double(), self.norm_at_first_bad)

    def check(self) -> tuple[int, str] | None:
        """(step, what went wrong) for the first bad step, or None; one host sync. The loop records the loss
        reduced over processes and the global gradient norm, so every rank gets the same answer."""
        step = int(self.first_bad.item())
        if step == _NONE:
            return None
        loss, norm = self.loss_at_first_bad.item(), self.norm_at_first_bad.item()
        return step, f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
