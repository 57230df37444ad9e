"""Save small random-init models (no downloads): the BLIP-2 and ViT assets, or one modern VLM family.

* ``--assets``: ``assets/tiny-blip2``, a ``Blip2ForConditionalGeneration`` (ViT with fused qkv, Q-Former
  with cross-attention, OPT decoder) with a ``Blip2Processor`` that loads with
  ``AutoModelForImageTextToText``; and ``assets/tiny-vit``, a timm ``VisionTransformer`` (48 px, patch 8)
  in timm's hub layout (``timm.create_model("local-dir:assets/tiny-vit")``). ``--out DIR`` instead of
  ``--assets`` writes the same two folders under DIR.
* ``--family NAME --out DIR``: a tiny random-init model of a modern VLM family with its processor
  (offline byte-level BPE tokenizer, the family's image processor at 16-32 px, a chat template in the
  family's style); ``open_clip`` writes a tiny open_clip CLIP folder.

All are random init (seeded): the recipes show the mechanics, not pretrained quality. ``--out`` is
required unless ``--assets`` is given, so nothing lands in ``assets/`` by accident::

    python scripts/make_tiny_models.py --assets
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


def main(argv: list[str] | None = None) -> None:
    from vlm_lora.architectures.tiny_models import save_tiny_blip2, save_tiny_open_clip
    from vlm_lora.architectures.tiny_processors import STYLE, save_tiny_family

    families = sorted(STYLE) + ["open_clip"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder to write to (required unless --assets)")
    parser.add_argument("--family", choices=families, metavar="NAME",
                        help=f"write only a tiny model of this family to --out; one of: {', '.join(families)}")
    parser.add_argument("--assets", action="store_true",
                        help="rebuild the embedded assets/tiny-blip2 and assets/tiny-vit (no --out, no --family)")
    args = parser.parse_args(argv)
    if args.assets and (args.out or args.family):
        parser.error("--assets writes assets/tiny-blip2 and assets/tiny-vit; drop --out and --family, "
                     "or drop --assets")
    if not args.assets and args.out is None:
        parser.error("--out DIR is required (or --assets to rebuild assets/tiny-blip2 and assets/tiny-vit)")
    if args.family == "open_clip":
        print("wrote", save_tiny_open_clip(args.out))
        return
    if args.family:
        print("wrote", save_tiny_family(args.family, args.out))
        return
    out = REPO / "assets" if args.assets else args.out
    print("wrote", save_tiny_blip2(out / "tiny-blip2"))
    print("wrote", save_tiny_vit(out / "tiny-vit"))


if __name__ == "__main__":
    main()
