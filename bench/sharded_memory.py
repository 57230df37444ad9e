"""Peak memory per rank of sharded loading on CPU: a ~270M-parameter LLaVA-shaped float32 model, 2 gloo
processes under FSDP, against the same recipe on the embedded tiny model in 1 process::

    python bench/sharded_memory.py /tmp/llava-270m      # writes the model there once (~1.1 GB)

Target (issue 22): every rank's peak minus the tiny run's peak <= 0.7 x the model's bytes (the whole
base is 1.0x; a rank that loads it whole before sharding is above 1.0x). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTING = os.environ.get("CHECKPOINTING", "full")  # layer inputs only: the peak is weights, not activations


def make_model(out: Path) -> int:
    """A random LLaVA with a 12-layer 768-wide CLIP tower and a 14-layer 1024-wide Llama; returns its bytes."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from make_llava_shaped import save_llava_shaped

    if not (out / "model.safetensors").is_file():
        n = save_llava_shaped(out, 768, 3072, 12, 12, 1024, 2816, 14, 16, dtype=torch.float32)
        print(f"{n / 1e6:.0f}M params in {out}")
    return (out / "model.safetensors").stat().st_size

def recipe(tmp: Path, name: str, model: Path, fsdp: bool) -> Path:
    rows = (REPO / "assets" / "data" / "microscopy" / "train.jsonl").read_text().splitlines()[:16]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({**json.loads(r), "image": str(REPO / "assets" / "data" / "microscopy" /
                                                                       json.loads(r)["image"])}) + "\n" for r in rows))
    config = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    config.update(model={"path": str(model), "dtype": "float32"}, data={"train": str(data)}, output_dir=str(tmp / name))
    config["train"].update(batch_size=2, max_steps=2, save_steps=None, eval_steps=None, log_steps=1, fsdp=fsdp,
                           gradient_checkpointing=CHECKPOINTING)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peaks(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["peak_mem_mib"] for row in rows if "peak_mem_mib" in row][-1]


def main(model_dir: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    model_bytes = make_model(Path(model_dir))
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "vlm_lora", "finetune", str(recipe(tmp, "tiny", REPO / "assets" / "tiny-llava",
                                                                          False))], check=True, env=env)
    big = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlm_lora",
                          "finetune", str(recipe(tmp, "big", Path(model_dir), True))], env=env, capture_output=True,
                         text=True)
    if big.returncode:
        sys.exit(big.stderr[-3000:])
    tiny, ranks = peaks(tmp / "tiny")[0], peaks(tmp / "big")
    model_mib = model_bytes / 2 ** 20
    over = [(p - tiny) / model_mib for p in ranks]
    print(json.dumps({"model_mib": round(model_mib), "tiny_1proc_peak_mib": tiny, "rank_peaks_mib": ranks,
                      "rank_minus_tiny_over_model": [round(x, 3) for x in over], "target": 0.7,
                      "met": max(over) <= 0.7, "gradient_checkpointing": CHECKPOINTING, "sharded": "sharded loading:" in big.stderr}))
    print("\n".join(line for line in big.stderr.splitlines() if "sharded loading:" in line or "peak memory" in line))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llava-270m")
