"""The whole training loop, vlm-lora against HF Trainer + PEFT and the frozen floor, on the same data.

Every system trains the same random-weight model (saved once to a folder) for the same steps and
batch size on the same JPEG images and captions of 5-60 words, with LoRA r=16 on every
language-decoder linear and the connector trained. Presets: a LLaVA (with the embedded tiny-llava
processor resized to the preset's image size) or, ``qwen*`` presets, a Qwen2.5-VL (the 7B preset
from the published hyperparameters, with the tiny Qwen2.5-VL processor at the preset's image size:
336-px images -> 24 x 24 patches -> 144 merged image tokens). The 7B presets run at the batch sizes
users run (LLaVA-1.5-7B 16, Qwen2.5-VL-7B 32):

  floor            the limit: the same model with no LoRA (base frozen, connector trained), HF Trainer with
                   ``torch_compile`` (whole model; fixed shapes: every batch padded to the longest sample), same data settings as ``hf_peft``
  hf_peft          ``transformers.Trainer`` + ``peft.get_peft_model`` as a user who tunes it runs it: bf16 on
                   CUDA, ``adamw_torch_fused``, length-grouped sampling, a padding collator, and as many
                   DataLoader workers as vlm-lora's default on this machine (``--workers``)
  hf_peft_compile  the same with ``torch_compile=True`` (whole model, fixed shapes as for the floor)
  vlm_lora         ``vlm-lora finetune`` on a generated recipe (its real loop, its defaults; recipe keys via
                   ``--vlm-set``); ``vlm_lora_packed``: ``data.packing: true``; ``vlm_lora_compile``:
                   ``train.compile: true``; ``vlm_lora_liger``: ``train.kernels: liger`` (CUDA);
                   ``vlm_lora_full_head``: ``train.head_on_labels: false`` (lm_head on every position)

Each system runs in its own process (clean peak memory). One JSON line per system:
``tokens_per_s`` counts real tokens (image + text, no padding) over all steps; ``steady_*`` leave out
the first ``--skip`` steps (compile, warm-up); ``slowest_steps_s`` are the steady stalls; ``total_s``
sums every step, ``setup_s`` is the process's time before the first step (load, compile of nothing
yet); ``workers`` the DataLoader workers; ``mfu`` = 4 x language-model params x steady real tokens/s
/ the device's dense bf16 peak (null on CPU); ``vs_floor`` = steady step / the floor's; ``peak_mib``
is CUDA max allocated (CPU: max resident set). Then one line of ratios to ``hf_peft``. Examples::

    python bench/e2e.py                                   # CPU preset, a few minutes on 2 cores
    python bench/e2e.py --preset tiny                     # every system, smoke test
    python bench/e2e.py --device cuda --preset llava-7b --systems floor,hf_peft,hf_peft_compile,vlm_lora
    python bench/e2e.py --device cuda --preset qwen2.5-vl-7b  # Qwen2.5-VL-7B shapes, batch 32
    python bench/e2e.py --device cuda --preset llava-7b --steps 200 --systems hf_peft,vlm_lora  # 200-step total
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_data import (PROMPT, REPO, CaptionRows, PaddingCollator, build_model_folder, conversation,  # noqa: E402,F401
                      llava_config, make_data, qwen_config, real_tokens, row_tokens)

PRESETS = {
    # vision hidden/layers, image px, patch, text hidden/layers, MLP width, model vocab, batch, steps
    "tiny": dict(vh=64, vl=2, img=48, patch=8, th=64, tl=2, inter=128, vocab=384, batch=4, steps=4),
    "cpu": dict(vh=128, vl=2, img=48, patch=8, th=256, tl=4, inter=688, vocab=4096, batch=8, steps=24),
    "llava-7b": dict(vh=1024, vl=24, img=336, patch=14, th=4096, tl=32, inter=11008, vocab=32064, batch=16, steps=24),
    "qwen-tiny": dict(arch="qwen2_5_vl", vh=32, vl=2, img=32, patch=4, th=48, tl=2, inter=96, vocab=512, batch=4,
                      steps=4),
    "qwen2.5-vl-7b": dict(arch="qwen2_5_vl", img=336, patch=14, published="Qwen/Qwen2.5-VL-7B-Instruct", batch=32,
                          steps=24),
}
CONNECTOR = {"llava": "multi_modal_projector", "qwen2_5_vl": "merger"}  # PEFT modules_to_save, per arch
VLM_LORA_SYSTEMS = {  # system -> recipe overrides on top of the generated recipe
    "vlm_lora": [], "vlm_lora_packed": ["data.packing=true"], "vlm_lora_compile": ["train.compile=true"],
    "vlm_lora_liger": ["train.kernels=liger"], "vlm_lora_full_head": ["train.head_on_labels=false"],
    "vlm_lora_unpadded": ["data.pad_to_multiple_of=null"],  # each batch as long as its longest sample
    "vlm_lora_cudnn_ragged": [],
    "vlm_lora_batched_vision": ["train.batched_vision_attention=true"],  # Qwen-VL: windows batched by length
    "vlm_lora_batched_vision_compile": ["train.batched_vision_attention=true", "train.compile=true"],
    "vlm_lora_per_chunk_vision": ["train.batched_vision_attention=false"],  # transformers' per-window calls
    "vlm_lora_dora_compile": ["components.language_decoder.variant=dora", "train.compile=true"],
    "vlm_lora_qlora_compile": ["model.quantization.bits=4", "train.compile=true"],  # NF4 base (CUDA)
}
# Environment of a system's process. On Hopper, SDPA runs cuDNN attention, which builds a plan for every new
# sequence length (most steps of a dynamic-length run); this asks torch to serve every length from one plan.
SYSTEM_ENV = {"vlm_lora_cudnn_ragged": {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}}
HF_SYSTEMS = {"floor": dict(lora=False, compile=True), "hf_peft": dict(lora=True, compile=False),
              "hf_peft_compile": dict(lora=True, compile=True)}
SYSTEMS = [*HF_SYSTEMS, *VLM_LORA_SYSTEMS]
LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "A10": 125e12, "L4": 121e12, "B200": 2250e12}  # dense (no sparsity) bf16 FLOP/s by datasheet


def vlm_lora_recipe(model_dir: Path, data: Path, out: Path, args, overrides: list[str]) -> dict:
    """The generated recipe of a vlm-lora system (LoRA r16 on the decoder linears, connector trained)."""
    from vlm_lora.recipe import apply_overrides

    cuda = args.device == "cuda"
    recipe = {
        "model": {"path": str(model_dir), "dtype": "bfloat16" if cuda else "float32"},
        "strategy": "language_only",
        "components": {"language_decoder": {"mode": "lora", "rank": 16, "alpha": 32, "dropout": 0.0,
                                            "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
                       "connector": {"mode": "full"}, "vision_encoder": {"mode": "frozen"}},
        "data": {"train": str(data), "prompt": PROMPT, "num_workers": args.workers},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 2e-4, "warmup_steps": 0,
                  "log_steps": args.steps, "save_steps": None, "eval_base": False, "tensorboard": False,
                  "mixed_precision": "bf16" if cuda else "no"},
        "output_dir": str(out),
    }
    if getattr(args, "profile", None):
        recipe["train"]["profile_steps"] = list(args.profile)
    return apply_overrides(recipe, overrides + args.vlm_set)


def run_vlm_lora(model_dir: Path, data: Path, out: Path, args, overrides: list[str]) -> list[float]:
    """``vlm-lora finetune`` on a generated recipe; returns the wall time of every optimizer step."""
    from vlm_lora.recipe import validate_recipe
    from vlm_lora.train.loop import finetune

    finetune(validate_recipe(vlm_lora_recipe(model_dir, data, out, args, overrides)), overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # host wall time of each step, read the way the HF rows read theirs (a callback at each step's end, one
    # log at the end): with no per-step host sync the host runs ahead, and the times sum to the run's
    return [t for r in rows for t in r.get("step_seconds", [])]


def run_hf(model_dir: Path, data: Path, out: Path, args, lora: bool, compile: bool) -> list[float]:
    """HF ``Trainer`` (+ PEFT LoRA when ``lora``, else the frozen floor with the connector trained);
    returns the wall time of every optimizer step."""
    from transformers import (AutoModelForImageTextToText, AutoProcessor, Trainer, TrainerCallback,
                              TrainingArguments)

    cuda = args.device == "cuda"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    connector = CONNECTOR[model.config.model_type]
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LM_TARGETS,
                                                 modules_to_save=[connector]))
    else:
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.endswith("." + connector):
                module.requires_grad_(True)
    # Compiled systems get fixed shapes, as a user who compiles would arrange: every batch padded to the
    # longest sample, so one static graph serves every step (dynamic shapes compiled for over 220 s on a 7B).
    max_length = args.fixed_length if compile else None
    fields = TrainingArguments.__dataclass_fields__
    grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                else {"group_by_length": True})  # older transformers
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, bf16=cuda, optim="adamw_torch_fused",
        remove_unused_columns=False, save_strategy="no", logging_steps=args.steps, report_to=[], seed=0,
        dataloader_pin_memory=cuda, dataloader_num_workers=args.workers, torch_compile=compile, **grouping)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    class Profile(TrainerCallback):  # --profile: the same record of the same steps as vlm-lora's profile_steps
        def __init__(self):
            from vlm_lora.train.profiling import StepProfiler

            self.profiler = StepProfiler(args.profile, out / "profile", torch.device(args.device))

        def on_step_begin(self, training_args, state, control, **k):
            self.profiler.before(state.global_step + 1)

        def on_step_end(self, training_args, state, control, **k):
            self.profiler.after(state.global_step)

    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=CaptionRows(data, processor.tokenizer),
                      data_collator=PaddingCollator(processor, max_length), callbacks=[clock, Profile()])
    trainer.train()
    return clock.times


def child(args) -> None:
    """Run one system and print its step times, set-up time and peak memory as one JSON line."""
    started = time.perf_counter()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    work = Path(args.work)
    out = work / f"run_{args.system}"
    model_dir, data = work / "model", work / "data" / "train.jsonl"
    if args.system in HF_SYSTEMS:
        times = run_hf(model_dir, data, out, args, **HF_SYSTEMS[args.system])
    else:
        times = run_vlm_lora(model_dir, data, out, args, VLM_LORA_SYSTEMS[args.system])
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    setup = time.perf_counter() - started - sum(times)
    measured = json.dumps({"times": times, "peak_mib": peak, "setup_s": setup})
    (work / f"{args.system}.result.json").write_text(measured)  # not parsed from stdout, which libraries share
    print("E2E " + measured, flush=True)


def language_model_params(model_dir: Path) -> int:
    """Parameters of the language model (names under ``language_model``), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for name, p in model.named_parameters() if "language_model" in name)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of ``device_name`` from :data:`DENSE_BF16_PEAK` (None on CPU or an unknown GPU)."""
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in device_name.upper()), None)


def summarize(system: str, times: list[float], peak: float, tokens: int, n_samples: int, args,
              setup_s: float = 0.0, lm_params: int | None = None) -> dict:
    # --profile: the recorded steps and the one after (HF's clock counts the record's writing there) are not steady
    recorded = set(range(args.profile[0] - 1, sum(args.profile))) if getattr(args, "profile", None) else set()
    steady = [t for i, t in enumerate(times) if i >= args.skip and i not in recorded] or times
    total = sum(times)
    per_sample = tokens / n_samples
    steady_sps = args.batch / statistics.mean(steady)
    peak_rate = peak_flops(args.device_name) if args.device == "cuda" else None
    mfu = round(4 * lm_params * steady_sps * per_sample / peak_rate, 3) if peak_rate and lm_params else None
    return {"system": system, "preset": args.preset, "device": args.device_name, "batch": args.batch,
            "steps": len(times), "workers": args.workers, "tokens_per_s": round(tokens / total, 1),
            "samples_per_s": round(n_samples / total, 3), "step_s": round(statistics.median(times), 4),
            "first_steps_s": [round(t, 3) for t in times[:args.skip]],
            "steady_tokens_per_s": round(steady_sps * per_sample, 1), "steady_samples_per_s": round(steady_sps, 3),
            "steady_step_s": round(statistics.mean(steady), 4), "steady_median_s": round(statistics.median(steady), 4),
            "max_step_s": round(max(steady), 4), "slowest_steps_s": [round(t, 3) for t in sorted(steady)[-3:][::-1]],
            "total_s": round(total, 2), "setup_s": round(setup_s, 1), "mfu": mfu, "vs_floor": None,
            "peak_mib": round(peak, 1),
            "settings": HF_SYSTEMS.get(system) if system in HF_SYSTEMS else (
                VLM_LORA_SYSTEMS[system] + args.vlm_set + [f"{k}={v}" for k, v in SYSTEM_ENV.get(system, {}).items()])}


def earlier_rows(args) -> dict:
    """The ``--results`` file's rows of this preset, batch, steps and device, by system (the last of each)."""
    if not args.results or not Path(args.results).is_file():
        return {}
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    same = ("preset", "batch", "steps", "device")
    return {r["system"]: r for r in rows if "error" not in r and all(r.get(k) == getattr(args, k if k != "device"
                                                                                           else "device_name") for k in same)}


def main() -> None:
    from vlm_lora.data.loader import default_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu, or llava-7b on cuda")
    parser.add_argument("--systems", default="hf_peft,vlm_lora", help=f"comma list of {', '.join(SYSTEMS)}, or all")
    parser.add_argument("--steps", type=int, default=None, help="e.g. 200 for the total-time comparison")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the steady_* figures")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="DataLoader workers of the HF systems (default: vlm-lora's default on this machine)")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temp folder)")
    parser.add_argument("--vlm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the vlm_lora runs, e.g. train.compile=true")
    parser.add_argument("--results", default=None, help="JSONL file the rows are appended to; its floor and hf_peft "
                        "rows of the same preset, batch, steps and device count for vs_floor and the ratios")
    parser.add_argument("--system-timeout", type=float, default=None, help="seconds one system may run")
    parser.add_argument("--profile", default=None, type=lambda v: [int(x) for x in v.split(",")], metavar="FIRST,COUNT",
                        help="record steps FIRST..FIRST+COUNT-1 of every system with torch.profiler, to "
                             "WORK/run_<system>/profile/ (trace.json, ops.txt, summary.json)")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child process: run this one
    parser.add_argument("--fixed-length", type=int, default=None, help=argparse.SUPPRESS)  # compiled HF systems' pad
    args = parser.parse_args()
    args.preset = args.preset or ("llava-7b" if args.device == "cuda" else "cpu")
    p = PRESETS[args.preset]
    args.steps = args.steps or p["steps"]
    args.batch = args.batch or p["batch"]
    if args.system:
        return child(args)
    systems = SYSTEMS if args.systems == "all" else args.systems.split(",")
    systems.sort(key=lambda s: s != "floor")  # the floor first: every later row gets its vs_floor
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"--systems: unknown {', '.join(unknown)}; valid: {', '.join(SYSTEMS)}, all")
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="vlm_lora_e2e_"))
    n_samples = args.steps * args.batch  # one epoch: every sample is seen exactly once by every system
    if not (work / "model" / "config.json").is_file():
        build_model_folder(p, work / "model", args.device)
    data = make_data(work / "data", n_samples, p["img"])
    lengths = row_tokens(work / "model", data)
    tokens = sum(lengths)
    lm_params = language_model_params(work / "model")
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    rows = earlier_rows(args)
    for system in systems:
        command = [sys.executable, __file__, "--system", system, "--work", str(work), "--device", args.device,
                   "--preset", args.preset, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--workers", str(args.workers), "--fixed-length", str(max(lengths))]
        command += [f"--vlm-set={s}" for s in args.vlm_set]
        command += ["--profile", ",".join(map(str, args.profile))] if args.profile else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **SYSTEM_ENV.get(system, {})}
        result_file = work / f"{system}.result.json"
        result_file.unlink(missing_ok=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.system_timeout)
        except subprocess.TimeoutExpired:
            print(json.dumps({"system": system, "error": f"over --system-timeout {args.system_timeout} s"}), flush=True)
            continue
        # the child's whole output, kept whether it failed or not: the last lines may be a progress bar, and
        # the rest shows recompiles (TORCH_LOGS=recompiles) and warnings
        log_file = work / f"{system}.log"
        log_file.write_text(f"exit status {done.returncode}\n== stdout\n{done.stdout}\n== stderr\n{done.stderr}")
        if not result_file.is_file():
            tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
            print(json.dumps({"system": system, "error": tail, "returncode": done.returncode, "log": str(log_file)}),
                  flush=True)
            continue
        measured = json.loads(result_file.read_text())
        rows[system] = summarize(system, measured["times"], measured["peak_mib"], tokens, n_samples, args,
                                 measured["setup_s"], lm_params)
        if done.returncode:  # it measured, then failed (e.g. at exit): the figures stand, the failure shows
            rows[system]["child_exit_status"] = done.returncode
        if HF_SYSTEMS.get(system, {}).get("compile"):  # its batches are padded: say how much of them is padding
            rows[system]["settings"] = {**rows[system]["settings"], "fixed_length": max(lengths),
                                        "padding_share": round(1 - tokens / (max(lengths) * len(lengths)), 3)}
        if "floor" in rows:
            rows[system]["vs_floor"] = round(rows[system]["steady_step_s"] / rows["floor"]["steady_step_s"], 3)
        print(json.dumps(rows[system]), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(rows[system]) + "\n")
    if "hf_peft" in rows:
        base = rows["hf_peft"]
        ratios = {s: {key: round(r[key] / base[key], 3) for key in ("tokens_per_s", "steady_tokens_per_s", "peak_mib")}
                  for s, r in rows.items() if s != "hf_peft"}
        print(json.dumps({"ratios_vs_hf_peft": ratios, "preset": args.preset, "device": args.device_name}), flush=True)


if __name__ == "__main__":
    main()
