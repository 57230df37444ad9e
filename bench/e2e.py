"""The whole training loop, vlm-lora against HF Trainer + PEFT, on the same generated image-text data.

Both systems train the same random-weight model (saved once to a folder) for the same steps and
batch size on the same JPEG images and captions of 5-60 words, with LoRA r=16 on every
language-decoder linear and the connector trained. Presets: a LLaVA (with the embedded tiny-llava
processor resized to the preset's image size) or, ``qwen*`` presets, a Qwen2.5-VL (the 7B preset
from the published hyperparameters, with the tiny Qwen2.5-VL processor at the preset's image size:
336-px images -> 24 x 24 patches -> 144 merged image tokens):

  vlm_lora         ``vlm-lora finetune`` on a generated recipe (its real loop; recipe keys via ``--vlm-set``)
  vlm_lora_packed  the same with ``data.packing: true`` (padding-free rows); ``vlm_lora_compile``:
                   ``train.compile: true``; ``vlm_lora_liger``: ``train.kernels: liger`` (CUDA)
  hf_peft          ``transformers.Trainer`` + ``peft.get_peft_model`` with its best stock settings:
                   bf16 on CUDA, ``adamw_torch_fused``, length-grouped sampling, a padding collator

Each system runs in its own process (clean peak memory). One JSON line per system:
``tokens_per_s`` counts real tokens (image + text, no padding) of the data set; ``steady_*`` leave
out the first ``--skip`` steps; ``peak_mib`` is CUDA max allocated (CPU: max resident set);
then one line of ratios to ``hf_peft``. Examples::

    python bench/e2e.py                                   # CPU preset, a few minutes on 2 cores
    python bench/e2e.py --device cuda --preset llava-7b   # LLaVA-1.5-7B shapes, 336-px images, bf16
    python bench/e2e.py --device cuda --preset qwen2.5-vl-7b  # Qwen2.5-VL-7B shapes, 336-px images, bf16
    python bench/e2e.py --preset tiny --steps 3 --skip 1  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    # vision hidden/layers, image px, patch, text hidden/layers, MLP width, model vocab, batch, steps
    "tiny": dict(vh=64, vl=2, img=48, patch=8, th=64, tl=2, inter=128, vocab=384, batch=4, steps=4),
    "cpu": dict(vh=128, vl=2, img=48, patch=8, th=256, tl=4, inter=688, vocab=4096, batch=8, steps=24),
    "llava-7b": dict(vh=1024, vl=24, img=336, patch=14, th=4096, tl=32, inter=11008, vocab=32064, batch=8, steps=40),
    "qwen-tiny": dict(arch="qwen2_5_vl", vh=32, vl=2, img=32, patch=4, th=48, tl=2, inter=96, vocab=512, batch=4,
                      steps=4),
    "qwen2.5-vl-7b": dict(arch="qwen2_5_vl", img=336, patch=14, published="Qwen/Qwen2.5-VL-7B-Instruct", batch=8,
                          steps=40),
}
CONNECTOR = {"llava": "multi_modal_projector", "qwen2_5_vl": "merger"}  # PEFT modules_to_save, per arch
VLM_LORA_SYSTEMS = {  # system -> recipe overrides on top of the generated recipe
    "vlm_lora": [], "vlm_lora_packed": ["data.packing=true"], "vlm_lora_compile": ["train.compile=true"],
    "vlm_lora_liger": ["train.kernels=liger"],
}
SYSTEMS = ["hf_peft", *VLM_LORA_SYSTEMS]
LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
WORDS = ("cell nucleus stain membrane lesion lower upper left right center dense sparse round oval cluster "
         "pink blue purple dark light small large edge field tissue sample visible several few many shows "
         "a the with and of in near around").split()
PROMPT = "Describe the image."


# ---------------------------------------------------------------- inputs shared by both systems

def build_model_folder(p: dict, folder: Path, device: str) -> None:
    """A random-weight model of preset ``p`` with its processor at ``p['img']``-px images (built on
    ``device``; saved in bf16 from CUDA, else fp32)."""
    from transformers import AutoModelForImageTextToText

    config, processor = {"llava": llava_config, "qwen2_5_vl": qwen_config}[p.get("arch", "llava")](p)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        model = AutoModelForImageTextToText.from_config(config)
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are child processes: leave them the memory
    processor.save_pretrained(folder)


def llava_config(p: dict):
    """LLaVA config of preset ``p`` and the tiny-llava processor resized to ``p['img']``."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

    processor = AutoProcessor.from_pretrained(REPO / "assets" / "tiny-llava")
    base = LlavaConfig.from_pretrained(REPO / "assets" / "tiny-llava")
    processor.image_processor.size = {"shortest_edge": p["img"]}
    processor.image_processor.crop_size = {"height": p["img"], "width": p["img"]}
    processor.patch_size = p["patch"]
    vision = CLIPVisionConfig(hidden_size=p["vh"], intermediate_size=4 * p["vh"], num_hidden_layers=p["vl"],
                              num_attention_heads=max(1, p["vh"] // 64), image_size=p["img"], patch_size=p["patch"])
    text = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["th"], intermediate_size=p["inter"],
                       num_hidden_layers=p["tl"], num_attention_heads=max(1, p["th"] // 128),
                       max_position_embeddings=8192, bos_token_id=base.text_config.bos_token_id,
                       eos_token_id=base.text_config.eos_token_id, pad_token_id=base.text_config.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(p["img"] // p["patch"]) ** 2, pad_token_id=base.pad_token_id)
    return config, processor


def qwen_config(p: dict):
    """Qwen2.5-VL config of preset ``p`` (published 7B sizes, or the tiny sizes of ``p``) and the tiny
    Qwen2.5-VL processor taking ``p['img']``-px images whole; special-token ids follow its tokenizer."""
    from transformers import Qwen2_5_VLConfig

    from vlm_lora.architectures.published_configs import published_config
    from vlm_lora.architectures.tiny_processors import tiny_processor

    processor = tiny_processor("qwen2_5_vl")
    processor.image_processor.patch_size = p["patch"]
    pixels = p["img"] * p["img"]
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    ids = {name: processor.tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    tokenizer = processor.tokenizer
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if "published" in p:
        config = published_config(p["published"])
        for key, value in {**ids, **special}.items():
            setattr(config, key, value)
            setattr(config.text_config, key, value)
        return config, processor
    text = dict(hidden_size=p["th"], intermediate_size=p["inter"], num_hidden_layers=p["tl"], num_attention_heads=4,
                num_key_value_heads=2, vocab_size=p["vocab"], **special,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]})
    vision = dict(depth=p["vl"], hidden_size=p["vh"], intermediate_size=2 * p["vh"], num_heads=4, patch_size=p["patch"],
                  out_hidden_size=p["th"], window_size=4 * p["patch"], fullatt_block_indexes=[p["vl"] - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), processor


def make_data(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` JPEG images of random shapes and captions of 5-60 words; returns the caption JSONL."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 6)):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, max(3, size // 6))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / "images" / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "."
        rows.append({"image": f"images/{i:05d}.jpg", "caption": caption})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(caption: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def real_tokens(model_dir: Path, data: Path) -> int:
    """Image + text tokens of every sample (what a padding-free batch holds)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    total = 0
    for line in data.read_text().splitlines():
        row = json.loads(line)
        text = processor.apply_chat_template(conversation(row["caption"]), tokenize=False)
        image = Image.open(data.parent / row["image"]).convert("RGB")
        total += processor(images=[image], text=[text], return_tensors="pt")["input_ids"].shape[1]
    return total


# ---------------------------------------------------------------- the two systems (one per process)

def run_vlm_lora(model_dir: Path, data: Path, out: Path, args, overrides: list[str]) -> list[float]:
    """``vlm-lora finetune`` on a generated recipe; returns the wall time of every optimizer step."""
    from vlm_lora.recipe import apply_overrides, validate_recipe
    from vlm_lora.train.loop import finetune

    cuda = args.device == "cuda"
    recipe = {
        "model": {"path": str(model_dir), "dtype": "bfloat16" if cuda else "float32"},
        "strategy": "language_only",
        "components": {"language_decoder": {"mode": "lora", "rank": 16, "alpha": 32, "dropout": 0.0,
                                            "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
                       "connector": {"mode": "full"}, "vision_encoder": {"mode": "frozen"}},
        "data": {"train": str(data), "prompt": PROMPT},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 2e-4, "warmup_steps": 0,
                  "log_steps": 1, "save_steps": None, "eval_base": False, "tensorboard": False,
                  "mixed_precision": "bf16" if cuda else "no"},
        "output_dir": str(out),
    }
    finetune(validate_recipe(apply_overrides(recipe, overrides + args.vlm_set)), overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # log_steps 1: each row's samples_per_s covers exactly one step (data, forward, backward, optimizer)
    return [args.batch / r["samples_per_s"] for r in rows if "samples_per_s" in r]


class CaptionRows(torch.utils.data.Dataset):
    """The JSONL rows with the text's token ids (``input_ids``: what length grouping sorts by)."""

    def __init__(self, data: Path, tokenizer):
        self.rows = [json.loads(line) for line in data.read_text().splitlines()]
        self.root = data.parent
        self.ids = [tokenizer(PROMPT + " " + r["caption"])["input_ids"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "image": str(self.root / self.rows[i]["image"]),
                "caption": self.rows[i]["caption"]}


class PaddingCollator:
    """What LLaVA/TRL scripts do: render, process with ``padding=True``, labels = answer tokens."""

    def __init__(self, processor):
        self.processor = processor
        processor.tokenizer.padding_side = "right"  # training pads right (LLaVA's train.py does the same)

    def __call__(self, items: list[dict]) -> dict:
        from PIL import Image

        images = [Image.open(it["image"]).convert("RGB") for it in items]
        texts = [self.processor.apply_chat_template(conversation(it["caption"]), tokenize=False) for it in items]
        prompts = [self.processor.apply_chat_template(conversation(it["caption"])[:1], tokenize=False,
                                                      add_generation_prompt=True) for it in items]
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        prompt_lens = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")[
            "attention_mask"].sum(1)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens.tolist()):
            labels[row, :n] = -100
        batch["labels"] = labels
        return dict(batch)


def run_hf_peft(model_dir: Path, data: Path, out: Path, args) -> list[float]:
    """HF ``Trainer`` + PEFT LoRA; returns the wall time of every optimizer step."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForImageTextToText, AutoProcessor, Trainer, TrainerCallback,
                              TrainingArguments)

    cuda = args.device == "cuda"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LM_TARGETS,
                        modules_to_save=[CONNECTOR[model.config.model_type]])
    model = get_peft_model(model, config)
    fields = TrainingArguments.__dataclass_fields__
    grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                else {"group_by_length": True})  # older transformers
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, bf16=cuda, optim="adamw_torch_fused",
        remove_unused_columns=False, save_strategy="no", logging_steps=args.steps, report_to=[], seed=0,
        dataloader_pin_memory=cuda, **grouping)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=CaptionRows(data, processor.tokenizer),
                      data_collator=PaddingCollator(processor), callbacks=[clock])
    trainer.train()
    return clock.times


def child(args) -> None:
    """Run one system and print its step times and peak memory as one JSON line."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    work = Path(args.work)
    out = work / f"run_{args.system}"
    if args.system == "hf_peft":
        times = run_hf_peft(work / "model", work / "data" / "train.jsonl", out, args)
    else:
        times = run_vlm_lora(work / "model", work / "data" / "train.jsonl", out, args, VLM_LORA_SYSTEMS[args.system])
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("E2E " + json.dumps({"times": times, "peak_mib": peak}), flush=True)


def summarize(system: str, times: list[float], peak: float, tokens: int, n_samples: int, args) -> dict:
    steady = times[args.skip:] or times
    total = sum(times)
    per_sample = tokens / n_samples
    steady_sps = args.batch / statistics.mean(steady)
    return {"system": system, "preset": args.preset, "device": args.device_name, "batch": args.batch,
            "steps": len(times), "tokens_per_s": round(tokens / total, 1), "samples_per_s": round(n_samples / total, 3),
            "step_s": round(statistics.median(times), 4), "first_steps_s": [round(t, 3) for t in times[:args.skip]],
            "steady_tokens_per_s": round(steady_sps * per_sample, 1), "steady_samples_per_s": round(steady_sps, 3),
            "steady_step_s": round(statistics.mean(steady), 4), "max_step_s": round(max(steady), 4),
            "total_s": round(total, 2), "peak_mib": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu, or llava-7b on cuda")
    parser.add_argument("--systems", default="hf_peft,vlm_lora", help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the steady_* figures")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temp folder)")
    parser.add_argument("--vlm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the vlm_lora runs, e.g. train.compile=true")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child process: run this one
    args = parser.parse_args()
    args.preset = args.preset or ("llava-7b" if args.device == "cuda" else "cpu")
    p = PRESETS[args.preset]
    args.steps = args.steps or p["steps"]
    args.batch = args.batch or p["batch"]
    if args.system:
        return child(args)
    unknown = [s for s in args.systems.split(",") if s not in SYSTEMS]
    if unknown:
        sys.exit(f"--systems: unknown {', '.join(unknown)}; valid: {', '.join(SYSTEMS)}")
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="vlm_lora_e2e_"))
    n_samples = args.steps * args.batch  # one epoch: every sample is seen exactly once by both systems
    if not (work / "model" / "config.json").is_file():
        build_model_folder(p, work / "model", args.device)
    data = make_data(work / "data", n_samples, p["img"])
    tokens = real_tokens(work / "model", data)
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    rows = {}
    for system in args.systems.split(","):
        command = [sys.executable, __file__, "--system", system, "--work", str(work), "--device", args.device,
                   "--preset", args.preset, "--steps", str(args.steps), "--batch", str(args.batch)]
        command += [f"--vlm-set={s}" for s in args.vlm_set]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        result = [line for line in done.stdout.splitlines() if line.startswith("E2E ")]
        if done.returncode or not result:
            print(json.dumps({"system": system, "error": done.stderr.strip().splitlines()[-3:]}), flush=True)
            continue
        measured = json.loads(result[-1][4:])
        rows[system] = summarize(system, measured["times"], measured["peak_mib"], tokens, n_samples, args)
        print(json.dumps(rows[system]), flush=True)
    if "hf_peft" in rows:
        base = rows["hf_peft"]
        ratios = {s: {"tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                      "steady_tokens_per_s": round(r["steady_tokens_per_s"] / base["steady_tokens_per_s"], 3),
                      "peak_mib": round(r["peak_mib"] / base["peak_mib"], 3)}
                  for s, r in rows.items() if s != "hf_peft"}
        print(json.dumps({"ratios_vs_hf_peft": ratios, "preset": args.preset, "device": args.device_name}), flush=True)


if __name__ == "__main__":
    main()
