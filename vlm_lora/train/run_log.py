"""What a run tells a person: metrics.jsonl (mirrored to TensorBoard) and the closing summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("vlm_lora")


class MetricsWriter:
    """``metrics.jsonl`` rows, mirrored to TensorBoard when it is installed."""

    def __init__(self, out: Path, tensorboard: bool, resume_step: int | None = None):
        """``resume_step``: continue the file of a resumed run, dropping its rows after that step (the
        killed run logged them past its last checkpoint; this run logs them again)."""
        path = out / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if _step(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a" if resume_step is not None else "w")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a half-written last line of a killed run: dropped


def fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def summary(out: Path, results: dict, train_time: float, total_time: float, steps: int, metric: str,
             best: dict, peak_mem_mib: float | None = None) -> None:
    peak = f", peak memory {peak_mem_mib:.0f} MiB (largest rank)" if peak_mem_mib is not None else ""
    lines = [f"done: {steps} steps in {train_time:.0f}s (total {total_time:.0f}s){peak}",
             f"adapter (PEFT format): {out / 'adapter'}" + (f"  [best {metric} {best['value']:.4f} at step {best['step']}]"
                                                          if best["step"] is not None else ""),
             f"last adapter: {out / 'adapter_last'}", f"loss curve: {out / 'loss.png'}"]
    for name in ("base", "adapted"):
        if name in results:
            lines.append(f"{name:>8}: {fmt(results[name])}")
    if results:
        lines.append(f"eval: {out / 'eval.json'}")
    log.info("\n" + "\n".join(lines))
