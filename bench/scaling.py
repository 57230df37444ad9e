"""Throughput and memory of one recipe on 1 process, DDP, FSDP and FSDP+QLoRA; one JSON line per setup.

GPU (2 H200s; the 1.3B LLaVA-shaped model from bench/make_llava_shaped.py)::

    python bench/make_llava_shaped.py /tmp/llava-shaped
    python bench/scaling.py --preset llava-1b --model /tmp/llava-shaped

CPU check (tiny LLaVA, 2 gloo processes, seconds)::

    python bench/scaling.py --preset cpu

Each setup runs ``vlm-lora finetune`` in fresh processes (torchrun for 2); samples/s is the mean of
the logged windows after the first (warm-up), peak memory the largest ``max_memory_allocated`` of
any rank (CPU: peak RSS). ``speedup`` is samples/s over the 1-process row's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS = {  # name -> (processes, extra --set overrides, CPU threads per process; None: the host's cores split)
    "1proc": (1, [], None),
    "ddp2": (2, [], None),
    "ddp2_1thread": (2, [], 1),  # what `accelerate launch` / torchrun give each process unless OMP_NUM_THREADS is set
    "fsdp2": (2, ["train.fsdp=true"], None),
    "fsdp2_qlora": (2, ["train.fsdp=true", "model.quantization.bits=4"], None),
}
PRESETS = {
    "llava-1b": {"model": "/tmp/llava-shaped", "steps": 40, "log_steps": 10, "batch_size": 16,
                 "overrides": ["model.dtype=bfloat16", "train.mixed_precision=bf16"]},
    "cpu": {"model": str(REPO / "assets" / "tiny-llava"), "steps": 6, "log_steps": 2, "batch_size": 4,
            "overrides": ["model.quantization.compute_dtype=float32"]},
}


def worker(argv: list[str]) -> None:
    """One rank: run finetune, then record this rank's peak memory beside the run's metrics."""
    import torch

    from vlm_lora.cli import main

    code = main(["finetune", *argv])
    rank = int(os.environ.get("RANK", "0"))
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    (out / f"peak_memory_rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_gib": peak}))
    sys.exit(code)


def run_setup(name: str, preset: dict, model: str, root: Path, timeout: int) -> dict:
    processes, extra, threads = SETUPS[name]
    out = root / name
    overrides = [f"model.path={model}", "data.eval=null", f"train.max_steps={preset['steps']}",
                 f"train.batch_size={preset['batch_size']}", f"train.log_steps={preset['log_steps']}",
                 "train.save_steps=null", "train.tensorboard=false", *preset["overrides"], *extra,
                 f"output_dir={out}"]
    args = [str(REPO / "recipes" / "quickstart.yaml"), "--overwrite"]
    for item in overrides:
        args += ["--set", item]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         "--nproc_per_node", str(processes)]
    # every setup gets the whole host: its cores split over its processes (torchrun would set 1 thread each)
    if threads is None:
        threads = 1 if preset is PRESETS["cpu"] else max(1, (os.cpu_count() or 1) // processes)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep carried wheels importable
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    if preset is PRESETS["cpu"]:
        env["ACCELERATE_USE_CPU"] = "1"
    row = {"setup": name, "processes": processes, "batch_per_process": preset["batch_size"], "steps": preset["steps"],
           "threads_per_process": threads}
    try:
        done = subprocess.run([*launcher, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout}s"}
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1:] or "failed"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [m["samples_per_s"] for m in metrics if "samples_per_s" in m]
    steady = windows[1:] or windows
    peaks = [json.loads(p.read_text())["peak_gib"] for p in sorted(out.glob("peak_memory_rank*.json"))]
    return {**row, "samples_per_s": sum(steady) / len(steady), "peak_gib_per_process": peaks,
            "final_loss": metrics[-1]["loss"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", help="model folder (default: the preset's)")
    parser.add_argument("--setups", default="1proc,ddp2,fsdp2,fsdp2_qlora",
                        help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per setup")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; valid: {', '.join(SETUPS)}")
    baseline = None
    with tempfile.TemporaryDirectory(prefix="vlm-lora-scaling-") as root:
        for name in args.setups.split(","):
            row = run_setup(name, preset, args.model or preset["model"], Path(root), args.timeout)
            if name == "1proc" and "samples_per_s" in row:
                baseline = row["samples_per_s"]
            if baseline and "samples_per_s" in row:
                row["speedup"] = row["samples_per_s"] / baseline
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
