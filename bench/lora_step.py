"""Time one LoRA training step against the frozen model's floor and PEFT, in one process.

Every variant trains the same LLaVA-shaped (or, ``--preset qwen2.5-vl-7b``, Qwen2.5-VL-shaped) model
(random weights) on the same batch:

  floor            base frozen, connector trained (forward + activation-grad backward)
  peft / vlm_lora  LoRA r=16 on all language-decoder linears + connector (PEFT: modules_to_save)
  *_vision         plus vision q/v LoRA r=64 (floor_vision: backward runs through the vision tower); on
                   Qwen-VL's fused ``attn.qkv`` vlm-lora adapts the q and v slices, PEFT the whole qkv
  *_dora           DoRA instead of LoRA
  *_gc             gradient checkpointing on the language decoder (train.gradient_checkpointing: full);
                   *_gcsel every second layer (selective), *_gcoff full with saved inputs in pinned CPU memory (offload)
  *_compile        each decoder layer compiled (train.compile: regional torch.compile), after the eager variants
  *_head           lm_head and loss on the labelled positions only (train.head_on_labels, vlm-lora's default
                   training path; the other variants take the model's own loss over every position)
  *_qlora          language-decoder linears in bitsandbytes NF4 (double quant); runs last
  *_vera, vlm_lora_dylora, vlm_lora_adalora   the other variants (r=16), on request only (--variants)

Prints one JSON line per variant (step_s = median of timed steps after warm-up; warmup_s = the warm-up
steps' times, compile included) and a final line of ratios to the matching floor. Examples::

    python bench/lora_step.py                                   # CPU preset, about a minute on 2 cores
    python bench/lora_step.py --device cuda --preset llava-7b   # design-notes shapes, bf16 autocast
    python bench/lora_step.py --preset tiny --steps 1 --warmup 0 # CI smoke test
    python bench/lora_step.py --device cuda --preset qwen2.5-vl-7b --variants floor,peft,vlm_lora,floor_vision,peft_vision,vlm_lora_vision
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from vlm_lora.train.profiling import kernel_summary

PRESETS = {
    # name: (vision hidden, vision layers, image, patch, text hidden, text layers, intermediate, vocab, batch, text tokens)
    "tiny": dict(vh=32, vl=2, img=16, patch=8, th=64, tl=2, inter=128, vocab=128, batch=2, text=8),
    "cpu": dict(vh=256, vl=4, img=64, patch=8, th=512, tl=6, inter=1376, vocab=8192, batch=4, text=65),
    "llava-7b": dict(vh=1024, vl=24, img=336, patch=14, th=4096, tl=32, inter=11008, vocab=32064, batch=4, text=128),
    # Qwen2.5-VL: patch 14, 2 x 2 merge; 728 px images -> 52 x 52 patches -> 676 image tokens per sample
    "qwen-tiny": dict(arch="qwen2_5_vl", vh=32, vl=2, img=16, patch=4, th=48, tl=2, inter=96, vocab=160, batch=2,
                      text=8),
    "qwen2.5-vl-7b": dict(arch="qwen2_5_vl", img=728, patch=14, batch=4, text=128, published="Qwen/Qwen2.5-VL-7B-Instruct"),
}
# per model kind: connector child of ``model.model``, PEFT target regexes, the patch embedding path
ARCH = {
    "llava": dict(connector="multi_modal_projector", vision_qv=r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj",
                  vision_rank=r"vision_tower.*", patch="model.vision_tower.embeddings.patch_embedding"),
    "qwen2_5_vl": dict(connector="visual.merger", vision_qv=r"model\.visual\.blocks\.\d+\.attn\.qkv",
                       vision_rank=r"visual\.blocks.*", patch="model.visual.patch_embed"),
}
ALL_VARIANTS = ["floor", "peft", "vlm_lora", "floor_vision", "peft_vision", "vlm_lora_vision",
                "peft_dora", "vlm_lora_dora", "floor_gc", "peft_gc", "vlm_lora_gc", "peft_qlora", "vlm_lora_qlora"]
FAMILY_VARIANTS = ["peft_vera", "vlm_lora_vera", "vlm_lora_dylora", "vlm_lora_adalora"]  # not in the default run
CHECKPOINT_VARIANTS = ["floor_gc", "peft_gc", "vlm_lora_gc", "floor_gcsel", "vlm_lora_gcsel", "floor_gcoff",
                       "vlm_lora_gcoff"]
CHECKPOINTING = {"gc": "full", "gcsel": "selective", "gcoff": "offload"}  # variant kind -> train.gradient_checkpointing
FLOOR_OF = {"vision": "floor_vision", "compile": "floor", "head": "floor_head",
            **{kind: f"floor_{kind}" for kind in CHECKPOINTING}}
LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def build_model(p: dict, device: str, dtype: torch.dtype):
    if p.get("arch") == "qwen2_5_vl":
        return build_qwen(p, device, dtype)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=p["vh"], intermediate_size=4 * p["vh"], num_hidden_layers=p["vl"],
                              num_attention_heads=max(1, p["vh"] // 64), image_size=p["img"], patch_size=p["patch"])
    text = LlamaConfig(hidden_size=p["th"], intermediate_size=p["inter"], num_hidden_layers=p["tl"],
                       num_attention_heads=max(1, p["th"] // 128), vocab_size=p["vocab"],
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=p["vocab"] - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _instantiate(LlavaForConditionalGeneration, config, device, dtype)


def _instantiate(model_class, config, device: str, dtype: torch.dtype):
    """Seeded random-init ``model_class(config)`` built directly on ``device`` in ``dtype``, SDPA attention,
    in training mode (gradient checkpointing only acts in train mode; these configs have no dropout)."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = model_class(config)
        finally:
            torch.set_default_dtype(default)
    return model.train()


def build_qwen(p: dict, device: str, dtype: torch.dtype):
    """Qwen2.5-VL from its published 7B hyperparameters (``published``) or the tiny sizes of ``p``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if "published" in p:
        from vlm_lora.architectures.published_configs import published_config

        config = published_config(p["published"])
    else:
        text = dict(hidden_size=p["th"], intermediate_size=p["inter"], num_hidden_layers=p["tl"], num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=p["vocab"],
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]})
        vision = dict(depth=p["vl"], hidden_size=p["vh"], intermediate_size=2 * p["vh"], num_heads=4, patch_size=p["patch"],
                      out_hidden_size=p["th"], window_size=2 * 2 * p["patch"], fullatt_block_indexes=[p["vl"] - 1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=p["vocab"] - 1,
                                  video_token_id=p["vocab"] - 2, vision_start_token_id=p["vocab"] - 3)
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, device, dtype)


def make_qwen_batch(p: dict, model, device: str, dtype: torch.dtype) -> dict:
    """One image per sample as flattened 2-frame patches [B * side^2, 3 * 2 * patch^2], ``image_grid_thw``,
    then ``text`` tokens; labels on the text."""
    config, side = model.config, p["img"] // p["patch"]
    n_image = side * side // 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vision_start_token_id, (p["batch"], 1 + n_image + p["text"]), generator=g)
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1:1 + n_image] = config.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_image] = -100
    pixels = torch.randn(p["batch"] * side * side, 3 * 2 * p["patch"] ** 2, generator=g)
    grid = torch.tensor([[1, side, side]] * p["batch"])
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device, dtype), "image_grid_thw": grid.to(device),
            "mm_token_type_ids": (ids == config.image_token_id).int().to(device)}


def make_batch(p: dict, model, device: str, dtype: torch.dtype) -> dict:
    if p.get("arch") == "qwen2_5_vl":
        return make_qwen_batch(p, model, device, dtype)
    n_image = (p["img"] // p["patch"]) ** 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, p["vocab"] - 1, (p["batch"], n_image + p["text"]), generator=g)
    ids[:, 1:1 + n_image] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_image] = -100
    pixels = torch.randn(p["batch"], 3, p["img"], p["img"], generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "pixel_values": pixels.to(device, dtype)}


def shorter_batch(batch: dict, drop: int) -> dict:
    """``batch`` without its last ``drop`` text tokens (every per-token tensor [B, T, ...] cut alike)."""
    if not drop:
        return batch
    length = batch["input_ids"].shape[1]
    return {key: value[:, :length - drop] if value.dim() >= 2 and value.shape[:2] == batch["input_ids"].shape
            else value for key, value in batch.items()}


def split_variant(variant: str) -> tuple[str, str]:
    """'vlm_lora_dora' -> ('vlm_lora', 'dora'); 'peft' -> ('peft', '')."""
    for family in ("vlm_lora", "peft", "floor"):
        if variant == family or variant.startswith(family + "_"):
            return family, variant[len(family) + 1:]
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(ALL_VARIANTS)}")


def setup_variant(model, variant: str, arch: dict):
    """Make ``model`` trainable as ``variant``; returns (model to step, undo callable)."""
    family, kind = split_variant(variant)
    kind = kind.removesuffix("_head").removesuffix("head")  # *_head only changes the loss (step_loss)
    model.requires_grad_(False)
    undo = []
    if kind in CHECKPOINTING:
        from vlm_lora.train.speed import enable_gradient_checkpointing

        enable_gradient_checkpointing(model.model.language_model, CHECKPOINTING[kind])
        model.enable_input_require_grads()
        undo.append(model.model.language_model.gradient_checkpointing_disable)
    if kind == "compile":  # regional: the eager forwards come back on undo
        from vlm_lora.train.speed import checkpointable_layers, compile_decoder_layers

        compile_decoder_layers(model.model.language_model)
        undo.append(lambda: [setattr(layer, "_compiled_call_impl", None)
                             for layer in checkpointable_layers(model.model.language_model)])
        undo.append(torch._dynamo.reset)
    if family == "floor":
        model.model.get_submodule(arch["connector"]).requires_grad_(True)
        if kind == "vision":  # activations of the vision tower need grad, so backward walks it
            hook = model.get_submodule(arch["patch"]).register_forward_hook(
                lambda m, i, o: o.requires_grad_(True))
            undo.append(hook.remove)
        return model, undo
    if family == "peft":
        from peft import LoraConfig, get_peft_model

        targets, ranks = LM_TARGETS, {}
        if kind == "vision":
            targets = rf"({LM_TARGETS})|({arch['vision_qv']})"
            ranks = {arch["vision_rank"]: 64}
        if kind == "vera":
            from peft import VeraConfig

            peft_model = get_peft_model(model, VeraConfig(r=16, target_modules=targets, save_projection=True))
            model.model.get_submodule(arch["connector"]).requires_grad_(True)  # PEFT VeRA: modules_to_save fails here
            undo.append(lambda: peft_model.unload())
            return peft_model, undo
        config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, rank_pattern=ranks,
                            alpha_pattern={k: 2 * v for k, v in ranks.items()}, lora_dropout=0.0,
                            modules_to_save=[arch["connector"].split(".")[-1]], use_dora=kind == "dora")
        peft_model = get_peft_model(model, config)
        undo.append(lambda: peft_model.unload())
        return peft_model, undo
    import vlm_lora
    from vlm_lora.lora import unload_lora

    strategy = "both" if kind == "vision" else "language_only"
    overrides = {"vision_encoder": {"rank": 64, "targets": ["q", "v"]}} if kind == "vision" else {}
    if kind in ("dora", "vera", "dylora", "adalora"):
        overrides["language_decoder"] = {"variant": kind}
    vlm_lora.plan(model, strategy, **overrides).apply(model)
    undo.append(lambda: unload_lora(model, merge=False))
    return model, undo


def step_loss(model, batch: dict, variant: str) -> torch.Tensor:
    """The variant's training loss: the model's own, or (``*_head``) lm_head on labelled positions only;
    no KV cache in either (``training_kwargs``), as in vlm-lora's loop."""
    from vlm_lora.train.loss import labelled_token_loss, training_kwargs

    if variant.endswith("_head"):
        return labelled_token_loss(model, batch, **training_kwargs(model))
    return model(**batch, **training_kwargs(model)).loss


def time_variant(model, batches: list[dict], device: str, autocast_dtype, steps: int, warmup: int,
                 variant: str = "") -> dict:
    """Median step time and memory; step i runs ``batches[i % len(batches)]``."""
    from vlm_lora.lora.hooks import attach_step_hooks

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda" or None)  # same for every variant
    attach_step_hooks(model, optimizer, 0, 10 ** 6)  # DyLoRA's rank sample, AdaLoRA's budget (no-ops otherwise)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, warmup_times = [], []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = step_loss(model, batches[i % len(batches)], variant)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        (times if i >= warmup else warmup_times).append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    del optimizer
    # what stays allocated between steps (weights, gradients freed): the base's share of the peak
    resident = torch.cuda.memory_allocated() / 2 ** 20 if device == "cuda" else None
    return {"step_s": statistics.median(times), "warmup_s": [round(t, 3) for t in warmup_times], "peak_mib": peak,
            "resident_mib": resident, "loss": loss.item(), "trainable": sum(p.numel() for p in trainable)}


def profile_variant(model, batches: list[dict], device: str, autocast_dtype, path: str, variant: str = "") -> dict:
    """Profile two training steps (torch.profiler): the top-25 op table goes to ``path``; returns per-step
    figures: wall time, GPU kernel time (``busy`` = kernel time / wall), kernel launches, and kernel time
    by kind (GEMM, attention, optimizer, other: elementwise, copies, reductions)."""
    from torch.profiler import ProfilerActivity, profile

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda" or None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(i: int) -> None:
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = step_loss(model, batches[i % len(batches)], variant)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # the optimizer creates its state (zero-filled moments: memsets) here, not in the recorded steps
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(2):
            step(i)
        sync()
    wall = (time.perf_counter() - start) / 2
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=25))
    return kernel_summary(prof.events(), 2, wall * 2)


def run_variant(model, variant: str, arch, batches: list[dict], args, autocast, steps: int, warmup: int
                ) -> dict | None:
    """Time (and profile) ``variant`` on ``model``, then undo it; None when it ran out of GPU memory.

    A function of its own so that the variant's layers (held by its undo closures, and through them the
    base linears) are gone when it returns: ``quantize_language_decoder`` must leave no bf16 copy alive."""
    step_model, undo = setup_variant(model, variant, arch)
    try:
        result = time_variant(step_model, batches, args.device, autocast, steps, warmup, variant)
        if args.profile_dir:
            result["profile"] = profile_variant(step_model, batches, args.device, autocast,
                                                f"{args.profile_dir}/profile_{variant}.txt", variant)
    except torch.cuda.OutOfMemoryError:  # one variant over the card's memory: say so, run the others
        result = None
    for fn in reversed(undo):
        fn()
    return result


def quantize_language_decoder(model) -> None:
    from vlm_lora.quantize import quantize_linears

    quantize_linears(model, ["model.language_model"], compute_dtype="bfloat16" if model.dtype == torch.bfloat16
                     else "float32")
    gc.collect()  # the replaced bf16 linears, before the peak of the QLoRA variant is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu, or llava-7b on cuda")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS),
                        help="comma list, or 'checkpointing' for floor,vlm_lora and every checkpointing mode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on cuda, 12 on cpu)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the preset's)")
    parser.add_argument("--profile-dir", default=None, help="also write a torch.profiler table per variant here")
    parser.add_argument("--vary-length", type=int, default=1, metavar="N",
                        help="step i drops (i %% N) x 8 text tokens (fewer for short texts) from the batch's end: N lengths in turn, as "
                             "a run whose batches are padded to their own longest sample (default 1: one length)")
    args = parser.parse_args()
    preset = args.preset or ("llava-7b" if args.device == "cuda" else "cpu")
    p = PRESETS[preset] if args.batch is None else {**PRESETS[preset], "batch": args.batch}
    steps = args.steps if args.steps is not None else (10 if args.device == "cuda" else 12)
    warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 2)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    autocast = torch.bfloat16 if args.device == "cuda" else None
    variants = [v for v in args.variants.split(",") if v]
    if variants == ["checkpointing"]:
        variants = ["floor", "vlm_lora", *CHECKPOINT_VARIANTS]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.endswith("qlora")]
    last = ("compile", "qlora")  # compiled graphs after the eager runs; quantizing changes the base for good
    variants = sorted(variants, key=lambda v: next((i + 1 for i, k in enumerate(last) if k in v), 0))

    model = build_model(p, args.device, dtype)
    arch = ARCH[p.get("arch", "llava")]
    batch = make_batch(p, model, args.device, dtype)
    stride = max(1, min(8, (p["text"] - 1) // max(1, args.vary_length - 1)))  # never into the image tokens
    batches = [shorter_batch(batch, stride * k) for k in range(args.vary_length)]
    tokens = statistics.mean(b["input_ids"].numel() for b in batches)
    shape = {"preset": preset, "batch": p["batch"], "seq": batch["input_ids"].shape[1], "lengths": args.vary_length,
             "params": sum(x.numel() for x in model.parameters()),
             "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    results, quantized = {}, False
    for variant in variants:
        if variant.endswith("qlora") and not quantized:
            quantize_language_decoder(model)
            quantized = True
        result = run_variant(model, variant, arch, batches, args, autocast, steps, warmup)
        model.requires_grad_(False)
        if result is None:
            torch.cuda.empty_cache()
            print(json.dumps({"variant": variant, "error": "out of GPU memory", **shape}), flush=True)
            continue
        result.update(variant=variant, tokens_per_s=round(tokens / result["step_s"]), **shape)
        result["step_s"] = round(result["step_s"], 4)
        results[variant] = result
        print(json.dumps(result), flush=True)
    ratios = {}
    for variant, result in results.items():
        kind = split_variant(variant)[1]
        floor = results.get(FLOOR_OF.get(kind, "floor")) or results.get("floor")
        if floor and not variant.startswith("floor"):
            ratios[variant] = {"step_vs_floor": round(result["step_s"] / floor["step_s"], 3)}
            if result["peak_mib"] and floor["peak_mib"]:
                ratios[variant]["mem_vs_floor"] = round(result["peak_mib"] / floor["peak_mib"], 3)
            compiled_floor = results.get(f"floor_{kind}") if "compile" in kind else None
            if compiled_floor:  # also against the floor compiled the same way
                ratios[variant]["step_vs_compiled_floor"] = round(result["step_s"] / compiled_floor["step_s"], 3)
    print(json.dumps({"ratios": ratios, **shape}), flush=True)


if __name__ == "__main__":
    main()
