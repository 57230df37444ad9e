"""Does the data keep up? The finetune loop's samples/s against the bare training step's, per loader worker count.

bare:  one batch collated once and kept on the device; the loop's step on it (forward, backward, clip, AdamW).
loop:  ``vlm_lora.finetune`` itself on the same model, data, batch and precision with ``data.num_workers`` = w:
       every step decodes the images and runs the processor (in the workers when w > 0); samples/s is the
       median of its logged windows after the first (warm-up); data_wait the share of the loop's time spent
       blocked on the loader (the loop logs it as ``data_wait`` in metrics.jsonl).

Presets::

    python bench/data_loader.py                          # CPU: the quickstart (tiny-llava, 48-px PNGs), workers 0,1
    python bench/data_loader.py --device cuda --preset llava-7b --workers 0,2,4,8
        # LLaVA-1.5-7B shapes (CLIP-L/14-336 + 32x4096 Llama, random bf16 weights saved once to --model-dir),
        # 640x480 JPEGs generated on the fly and decoded every step, resized to 336 by the CLIP processor

Prints one JSON line per measurement, then ``{"threshold": 0.95, "workers_needed": w}``: the fewest workers
whose loop reaches 95% of the bare step's samples/s (null if none does).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QUICKSTART = {"language_decoder": {"mode": "lora", "rank": 16, "alpha": 32,
                                   "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
              "connector": {"mode": "full"}, "vision_encoder": {"mode": "frozen"}}
PRESETS = {
    "quickstart": dict(model=str(REPO / "assets" / "tiny-llava"), data=str(REPO / "assets" / "data" / "microscopy" /
                                                                          "train.jsonl"), batch=16, dtype="float32"),
    "llava-7b": dict(model=None, data=None, batch=8, dtype="bfloat16"),
}
WORDS = ("a small round cell with a dark nucleus near the left edge of the slide under blue stain and two faint "
         "granules in the cytoplasm beside a bright membrane").split()


def make_llava_7b(folder: Path) -> None:
    """LLaVA-1.5-7B shapes with random bf16 weights and the tiny-llava tokenizer, the CLIP processor at 336 px."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if (folder / "config.json").is_file():
        return
    base = LlavaConfig.from_pretrained(REPO / "assets" / "tiny-llava")
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=4096, bos_token_id=base.text_config.bos_token_id,
                       eos_token_id=base.text_config.eos_token_id, pad_token_id=base.text_config.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                         pad_token_id=base.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(REPO / "assets" / "tiny-llava")
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    processor.save_pretrained(folder)


def make_jpegs(folder: Path, n: int, size=(640, 480)) -> Path:
    """``n`` noisy JPEGs (COCO-sized, ~100-200 KB) with 20-40 word captions, as caption JSONL."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        noise = [Image.effect_noise(size, 40 + 10 * c).point(lambda v, s=rng.randint(0, 80): v + s) for c in range(3)]
        Image.merge("RGB", noise).save(folder / f"{i:04d}.jpg", quality=85)
        rows.append({"image": f"{i:04d}.jpg", "caption": " ".join(rng.choices(WORDS, k=rng.randint(20, 40)))})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl"


def recipe_for(args, model: str, data: str, workers: int, out: Path):
    from vlm_lora.recipe import validate_recipe

    return validate_recipe({
        "model": {"path": model, "dtype": args.dtype}, "strategy": "language_only", "components": QUICKSTART,
        "data": {"train": data, "num_workers": workers},
        "train": {"batch_size": args.batch, "max_steps": args.warmup + args.steps, "log_steps": args.log_steps,
                  "save_steps": None, "eval_steps": None, "eval_base": False, "learning_rate": 1e-4,
                  "mixed_precision": "bf16" if args.device == "cuda" else "no", "tensorboard": False},
        "output_dir": str(out)})


def bare_step(args, recipe) -> float:
    """Samples/s of the loop's step on one batch kept on the device (no data loading at all)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vlm_lora.planner import plan as make_plan
    from vlm_lora.train.optim import make_optimizer, param_groups
    from vlm_lora.train.setup import build_task_and_data, load_for_recipe

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    model, processor = load_for_recipe(recipe, accelerator.device)
    plan = make_plan(model, recipe.strategy, recipe.components)
    task, train_set, _ = build_task_and_data(recipe, model, processor)
    plan.apply(model)
    groups = param_groups(model, plan, recipe.train.learning_rate, 0.0)
    trainable = [p for g in groups for p in g["params"]]
    model, optimizer = accelerator.prepare(model, make_optimizer("adamw", groups, recipe.train.learning_rate))
    batch = {k: v.to(accelerator.device) for k, v in task.collate([train_set[i] for i in range(args.batch)]).items()}
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss, _ = task.loss(model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop reads the loss every step too
        times.append(time.perf_counter() - start)
    del model, optimizer, batch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return args.batch / statistics.median(times[args.warmup:])


def loop_samples_per_s(recipe) -> tuple[float, float]:
    """(samples/s, share of the time the loop waited for data): medians of the logged windows after the first."""
    from vlm_lora.train.loop import finetune

    finetune(recipe, overwrite=True)
    rows = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "samples_per_s" in r][1:]  # the first holds the warm-up
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return (statistics.median(r["samples_per_s"] for r in windows),
            statistics.median(r["data_wait"] for r in windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", default="0,1", help="comma-separated data.num_workers values to measure")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-steps", type=int, default=5, help="loop: steps per samples/s window")
    parser.add_argument("--images", type=int, default=256, help="llava-7b: JPEGs generated")
    parser.add_argument("--model-dir", default="/tmp/vlm_lora_bench_llava7b", help="llava-7b: where the model is saved")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.dtype = preset["dtype"] if args.device == "cuda" else "float32"
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would pick a GPU if there is one
    work = Path(tempfile.mkdtemp(prefix="vlm_lora_bench_data_"))
    model, data = preset["model"], preset["data"]
    if args.preset == "llava-7b":
        make_llava_7b(Path(args.model_dir))
        model, data = args.model_dir, str(make_jpegs(work / "jpegs", args.images))
    common = {"preset": args.preset, "device": args.device, "batch": args.batch, "steps": args.steps}
    bare = bare_step(args, recipe_for(args, model, data, 0, work / "bare"))
    print(json.dumps({"mode": "bare_step", **common, "samples_per_s": round(bare, 3)}), flush=True)
    needed = None
    for workers in [int(w) for w in args.workers.split(",")]:
        loop, wait = loop_samples_per_s(recipe_for(args, model, data, workers, work / f"loop_{workers}"))
        ratio = loop / bare
        print(json.dumps({"mode": "finetune_loop", **common, "workers": workers, "samples_per_s": round(loop, 3),
                          "ratio_to_bare": round(ratio, 3), "data_wait": round(wait, 3)}), flush=True)
        if needed is None and ratio >= 0.95:
            needed = workers
    print(json.dumps({"threshold": 0.95, "workers_needed": needed}))


if __name__ == "__main__":
    main()
