"""Numeric precision of a run: fp16 mixed precision with loss scaling, and what to say when training diverges.

``model.dtype: float16`` (GPUs without bf16: T4, V100) or ``train.mixed_precision: fp16`` trains as AMP:
the frozen base stays as loaded, every trainable weight (LoRA A/B, fully-trained modules) is fp32 so
AdamW's small updates are not rounded away, the forward runs under fp16 autocast, and a
``torch.amp.GradScaler`` scales the loss so fp16 gradients neither underflow nor overflow (a step with
inf/NaN gradients is skipped and the scale lowered). Pure fp16 weights under AdamW diverge at step 1.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from vlm_lora.train.checkpoint import list_checkpoints
from vlm_lora.train.setup import TrainingError


def uses_fp16_amp(model_dtype: str, mixed_precision: str) -> bool:
    """Whether the run trains with fp16 autocast and a gradient scaler (see the module docstring)."""
    if model_dtype == "float16" and mixed_precision == "bf16":
        raise TrainingError("model.dtype float16 trains as fp16 mixed precision, but train.mixed_precision is bf16; "
                            "load the model in bfloat16 (model.dtype) or set train.mixed_precision to auto or fp16")
    return model_dtype == "float16" or mixed_precision == "fp16"


def upcast_trainable(model: torch.nn.Module) -> int:
    """fp16/bf16 trainable parameters become fp32 master weights (frozen ones stay); returns how many changed."""
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            changed += 1
    return changed


class LossScaling:
    """fp16 autocast for the forward and a ``GradScaler`` around backward/step; a pass-through when off.

    Call order per optimizer step: ``backward(loss)`` for each micro-batch, ``unscale(optimizer)`` before
    clipping, ``step(optimizer)`` (skipped by the scaler on inf/NaN gradients)."""

    def __init__(self, enabled: bool, device: torch.device | str):
        self.device_type = torch.device(device).type
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(self.device_type) if enabled else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.float16) if self.enabled else nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.enabled:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)


def divergence_error(out: Path, step: int, what: str, recipe) -> str:
    """The message for a run stopped on a non-finite loss or weights: what happened, what is on disk,
    and only advice that applies to this recipe."""
    cfg = recipe.train
    found = list_checkpoints(out)
    kept = (f"The last good checkpoint is {found[-1]}." if found
            else "No checkpoint was written yet (train.save_steps).")
    advice = []
    if cfg.max_grad_norm is None:
        advice.append("set train.max_grad_norm (e.g. 1.0)")
    advice.append(f"lower train.learning_rate (now {cfg.learning_rate:g})")
    if recipe.model.dtype == "float16":
        advice.append("or load in bfloat16 / float32 (model.dtype) if the GPU supports it")
    advice.append("and check the data for empty or garbled answers")
    return f"training diverged at step {step + 1} ({what}); stopped without saving. {kept} Try: {', '.join(advice)}."
