"""Save the small random-init models the BLIP-2 and ViT recipes run on (no downloads).

* ``assets/tiny-blip2``: a ``Blip2ForConditionalGeneration`` (ViT with fused qkv, Q-Former with
  cross-attention, OPT decoder) with a ``Blip2Processor``; loads with ``AutoModelForImageTextToText``.
* ``assets/tiny-vit``: a timm ``VisionTransformer`` (48 px, patch 8) saved in timm's hub layout;
  loads with ``timm.create_model("local-dir:assets/tiny-vit")``.

Both are random init (seeded): the recipes show the mechanics, not pretrained quality::

    python scripts/make_tiny_models.py

``--family NAME --out DIR`` writes instead a tiny random-init model of a modern VLM family with its
processor (offline byte-level BPE tokenizer, the family's image processor at 16-32 px, a chat template
in the family's style) to DIR; NAME is one of qwen2_vl qwen2_5_vl qwen3_vl gemma3 paligemma idefics3
smolvlm mllama internvl llava_onevision (or open_clip: a tiny open_clip CLIP folder)::

    python scripts/make_tiny_models.py --family qwen2_5_vl --out /tmp/tiny-qwen2_5_vl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VIT_ARGS = {"img_size": 48, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def save_tiny_vit(path: Path) -> Path:
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **VIT_ARGS)
    path.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(path), model_args=VIT_ARGS, safe_serialization=True)
    return path


def main() -> None:
    from vlm_lora.architectures.tiny_models import save_tiny_blip2, save_tiny_open_clip
    from vlm_lora.architectures.tiny_processors import STYLE, save_tiny_family

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets")
    parser.add_argument("--family", choices=sorted(STYLE) + ["open_clip"],
                        help="write only a tiny model of this family to --out")
    args = parser.parse_args()
    if args.family == "open_clip":
        print("wrote", save_tiny_open_clip(args.out))
        return
    if args.family:
        print("wrote", save_tiny_family(args.family, args.out))
        return
    print("wrote", save_tiny_blip2(args.out / "tiny-blip2"))
    print("wrote", save_tiny_vit(args.out / "tiny-vit"))


if __name__ == "__main__":
    main()
