"""Scale bench: LoRA on a Qwen2.5-VL-72B-shaped base under FSDP2 (and FSDP2 + QLoRA), random weights made
per shard (no checkpoint on disk). One JSON line per setup: steps/s, tokens/s, MFU, peak memory per rank::

    torchrun --nproc_per_node 8 bench/scale.py --setups fsdp fsdp_qlora           # 72B shapes, GPUs
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 bench/scale.py --layers 2 --vision-layers 2 --shrink 32 \\
        --batch 1 --length 64 --steps 2                                            # the same path on CPU (gloo)

FSDP: the model is built on the meta device with LoRA on the language decoder (``language_only``), sharded
by the registry's units, then each rank allocates its shards and fills them with seeded random values
(no rank ever holds a full tensor). FSDP + QLoRA: each unit is made on the device, its base linears
quantized to NF4 packed in bf16 (``quant_storage``), then sharded, one unit at a time (a rank holds its
shards plus one unit). ``--layers``/``--vision-layers`` cut the depth, ``--shrink K`` divides every width
and the vocabulary by K (CPU runs). MFU counts 4 x parameters x tokens per step (a frozen base: forward
and input gradients, no weight gradients) over ``--peak-tflops`` (default: H100/H200 bf16 dense, 989).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

QWEN25_VL_72B = {  # Qwen/Qwen2.5-VL-72B-Instruct config.json
    "text_config": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 128000,
                    "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16,
                      "out_hidden_size": 8192, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
}
GRID = (1, 4, 4)  # one image of 4 x 4 patches per sample: 4 merged image tokens


def qwen_config(layers: int | None, vision_layers: int | None, shrink: int):
    """Qwen2.5-VL-72B's config with fewer layers and every width / the vocabulary divided by ``shrink``."""
    from transformers import Qwen2_5_VLConfig

    text, vision = dict(QWEN25_VL_72B["text_config"]), dict(QWEN25_VL_72B["vision_config"])
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    vision["depth"] = vision_layers or vision["depth"]
    vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
    for cfg, keys in ((text, ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                              "vocab_size")), (vision, ("hidden_size", "intermediate_size", "num_heads",
                                                        "out_hidden_size"))):
        for key in keys:
            cfg[key] = max(1, cfg[key] // shrink)
    ids = {k: v for k, v in QWEN25_VL_72B.items() if k.endswith("token_id")}
    if shrink > 1:  # the special tokens must stay inside the smaller vocabulary
        ids = {key: text["vocab_size"] - 1 - i for i, key in enumerate(sorted(ids))}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


@torch.no_grad()
def fill_random(tensor: torch.Tensor, name: str, seed: int) -> None:
    """Seeded values for one block: ones for norms, N(0, 0.02) otherwise (made where the block lives)."""
    if "norm" in name and tensor.dim() == 1:
        tensor.fill_(1.0)
        return
    generator = torch.Generator(tensor.device).manual_seed(seed)
    tensor.copy_(torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32) * 0.02)


def build(config, qlora: bool, dtype: str, device) -> tuple[torch.nn.Module, int]:
    """(the sharded model with LoRA on the language decoder, its parameter count)."""
    from vlm_lora.planner import plan as make_plan
    from vlm_lora.quantize import quantize_linears
    from vlm_lora.train.distributed import shard_model
    from vlm_lora.train.sharded_load import detach_adapters, local_block, meta_model

    rank = dist.get_rank()
    model = meta_model(config, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    plan = make_plan(model, "language_only")
    plan.apply(model)
    adapters = detach_adapters(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    names = {id(p): n for n, p in model.named_parameters()}
    low = "bf16" if dtype == "bfloat16" else "no"

    def make_unit(unit: torch.nn.Module) -> None:  # QLoRA: this unit's full weights, quantized, then sharded
        with torch.no_grad():
            for module_path, module in unit.named_modules():
                for leaf, param in list(module._parameters.items()):
                    if param is None or not param.is_meta or isinstance(param, DTensor):
                        continue  # a nested unit's parameters are sharded already
                    full = names[id(param)]
                    value = torch.empty_like(param, device=device)
                    if full in adapters:
                        value.copy_(adapters[full])
                    else:
                        fill_random(value, full, zlib.crc32(full.encode()))  # the same unit on every rank
                    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
        bases = [f"{path}.base_layer" for path, m in unit.named_modules()
                 if type(getattr(m, "base_layer", None)) is torch.nn.Linear]
        quantize_linears(unit, bases, "nf4", True, "bfloat16", "bfloat16")

    model = shard_model(model, low, prepare_unit=make_unit if qlora else None)
    with torch.no_grad():
        if not qlora:  # every rank allocates its shards and makes its own rows
            model.to_empty(device=device)
            for index, (name, param) in enumerate(model.named_parameters()):
                local, block = local_block(param)
                if name in adapters:
                    local.copy_(adapters[name][block])
                elif local.numel():
                    fill_random(local, name, index * 1009 + rank)
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    return model, n_params


def batch(config, size: int, length: int, device) -> dict:
    """``size`` samples of ``length`` tokens, each with one image of ``GRID`` patches at its start."""
    vision = config.vision_config
    merged = GRID[0] * GRID[1] * GRID[2] // vision.spatial_merge_size ** 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.image_token_id - 8, (size, length), generator=generator)
    ids[:, 0], ids[:, 1:1 + merged], ids[:, 1 + merged] = (config.vision_start_token_id, config.image_token_id,
                                                           config.vision_end_token_id)
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(size * math.prod(GRID), patch, generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device),
            "pixel_values": pixels.to(device), "image_grid_thw": torch.tensor([GRID] * size).to(device)}


def run(args, setup: str, device) -> dict:
    from vlm_lora.train.memory import rank_peaks

    config = qwen_config(args.layers, args.vision_layers, args.shrink)
    model, n_params = build(config, setup == "fsdp_qlora", args.dtype, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = batch(config, args.batch, args.length, device)
    times = []
    for _ in range(args.steps + 1):  # the first step is warm-up
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / args.steps
    world = dist.get_world_size()
    tokens = args.batch * args.length * world / step
    peak = args.peak_tflops * 1e12 if device.type == "cuda" else None
    return {"setup": setup, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "world": world, "text_layers": config.text_config.num_hidden_layers, "vision_layers": config.vision_config.depth,
            "shrink": args.shrink, "params_b": round(n_params / 1e9, 3), "batch_per_rank": args.batch,
            "length": args.length, "linears_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
            "steps_per_s": round(1 / step, 4), "tokens_per_s": round(tokens, 1),
            "mfu": round(4 * n_params * tokens / (world * peak), 4) if peak else None, "peak_mem_mib": rank_peaks(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=["fsdp", "fsdp_qlora"], choices=["fsdp", "fsdp_qlora"])
    parser.add_argument("--layers", type=int, help="decoder layers (default 80)")
    parser.add_argument("--vision-layers", type=int, help="vision blocks (default 32)")
    parser.add_argument("--shrink", type=int, default=1, help="divide widths and vocabulary by this")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, for MFU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from vlm_lora.train.memory import reset_peak

    for setup in args.setups:
        result = run(args, setup, device)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
        if cuda:
            torch.cuda.empty_cache()
        reset_peak(device)  # each setup's own peak
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
