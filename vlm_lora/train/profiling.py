"""``train.profile_steps``: a torch.profiler record of a few training steps of the real loop.

``profile_steps: [first, count]`` records optimizer steps ``first`` to ``first + count - 1`` (1-based, as the
progress bar counts) and writes, to ``output_dir/profile/``:

- ``trace.json``: the timeline (open in https://ui.perfetto.dev): host ops, data waits, kernels;
- ``ops.txt``: the top ops by device time (CPU: by host time);
- ``summary.json``: per step, the wall time, the GPU kernel time and its share of the wall (``busy``), the
  kernel launches, and kernel time by kind (GEMM, attention, optimizer, other), as ``kernel_summary`` reads them.

The step before ``first`` is waited for, so the record holds the recorded steps' own work; the recording itself
adds host overhead per op (a few percent on a step of large kernels).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("vlm_lora")

KERNEL_KINDS = {  # kind -> substrings of kernel names (lower case); first match wins, "other" takes the rest
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "gemm": ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas"),
    "optimizer": ("adam", "multi_tensor"),
}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS.items() if any(k in lowered for k in keys)), "other")


def kernel_summary(events, steps: int, wall_s: float) -> dict:
    """Per-step figures of ``steps`` recorded steps from profiler ``events`` (``prof.events()``) over
    ``wall_s`` seconds: kernel time (ms), ``busy`` = kernel time / wall, launches, kernel ms by kind."""
    kinds = {kind: 0.0 for kind in (*KERNEL_KINDS, "other")}
    launches = 0
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False) \
                or event.name.startswith(("Optimizer.", "ProfilerStep")):  # ranges on the GPU timeline, not kernels
            continue
        launches += 1
        kinds[kernel_kind(event.name)] += event.device_time / 1e3 / steps  # us -> ms, per step
    kernel_ms, wall_ms = sum(kinds.values()), wall_s * 1e3 / steps
    return {"wall_ms": round(wall_ms, 1), "kernel_ms": round(kernel_ms, 1),
            "busy": round(kernel_ms / wall_ms, 3) if wall_ms else None, "launches": launches // max(steps, 1),
            **{f"{k}_ms": round(v, 1) for k, v in kinds.items()}}


class StepProfiler:
    """Records optimizer steps ``first .. first + count - 1`` of a loop that calls ``before(step)`` and
    ``after(step)`` around each step (``step`` counts from 1). Does nothing when ``steps`` is None."""

    def __init__(self, steps: tuple[int, int] | list[int] | None, folder: Path, device: torch.device,
                 enabled: bool = True):
        self.first, self.count = (steps[0], steps[1]) if steps else (0, 0)
        self.folder, self.device, self.enabled = Path(folder), device, enabled and bool(steps)
        self._prof, self._started = None, 0.0

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()  # the record starts with this step's own work, not the tail of the one before
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._started = time.perf_counter()

    def after(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        self._sync()
        wall = time.perf_counter() - self._started
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / "trace.json"))
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        (self.folder / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        summary = {"steps": [self.first, self.last], **kernel_summary(prof.events(), self.count, wall)}
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("profile of steps %d-%d in %s: %s", self.first, self.last, self.folder,
                 ", ".join(f"{k} {v}" for k, v in summary.items() if k != "steps"))
