"""Time a Qwen2.5-VL vision tower forward with transformers' per-chunk attention and with
``train.batched_vision_attention`` (``vlm_lora/train/vision_attention.py``), on the same weights and patches.

    python bench/vision_attention.py                      # CPU: narrow tower (host cost), 4 images of 728 px
    python bench/vision_attention.py --device cuda --full # the published 32-layer, 1280-wide tower, bf16

Prints one JSON line per path (median forward time, attention calls per forward) and the ratio. The narrow
CPU tower keeps the real grid, windows and layer pattern, so it shows the per-chunk overhead, not GPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_tower(full: bool, device: str, dtype: torch.dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vlm_lora.architectures.published_configs import published_config

    config = published_config("Qwen/Qwen2.5-VL-7B-Instruct").vision_config
    if not full:  # same grid, windows and layer pattern; narrow, so the per-call host cost dominates
        config.update(dict(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64))
    config._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config).to(device, dtype).eval()


def time_forward(tower, patches, grid, device: str, repeats: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            tower(patches, grid_thw=grid)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def count_attention_calls(tower, patches, grid) -> int:
    import torch.nn.functional as F

    calls, original = [0], F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            tower(patches, grid_thw=grid)
    finally:
        F.scaled_dot_product_attention = original
    return calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true", help="the published tower width (default: narrow)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--pixels", type=int, default=728, help="image side in pixels (a multiple of 28)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from vlm_lora.train.vision_attention import batch_vision_attention

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    tower = build_tower(args.full, args.device, dtype)
    side = args.pixels // tower.config.patch_size
    grid = torch.tensor([[1, side, side]] * args.images, device=args.device)
    width = tower.config.in_channels * tower.config.temporal_patch_size * tower.config.patch_size ** 2
    patches = torch.randn(args.images * side * side, width, device=args.device, dtype=dtype)
    rows = {}
    for path in ("per_chunk", "batched"):
        if path == "batched":
            batch_vision_attention(tower)
        seconds = time_forward(tower, patches, grid, args.device, args.repeats)
        rows[path] = {"path": path, "forward_s": round(seconds, 4),
                      "attention_calls": count_attention_calls(tower, patches, grid), "images": args.images,
                      "pixels": args.pixels, "full_width": args.full,
                      "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
        print(json.dumps(rows[path]), flush=True)
    print(json.dumps({"speedup": round(rows["per_chunk"]["forward_s"] / rows["batched"]["forward_s"], 2)}))


if __name__ == "__main__":
    main()
