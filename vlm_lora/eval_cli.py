"""``vlm-lora eval`` and ``vlm-lora score``: caption a data set with models, score predictions."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_eval(args) -> None:
    from vlm_lora.adapter_io import load_adapter
    from vlm_lora.data import CaptionDataset
    from vlm_lora.evaluate import evaluate_captions, write_predictions
    from vlm_lora.modeling import load_model_and_processor

    model, processor = load_model_and_processor(args.model, args.dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    data = CaptionDataset(args.data, args.image_root)
    metrics, rows = evaluate_captions(model, processor, data, args.prompt, args.batch_size, args.max_new_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(rows, out.with_suffix(".predictions.jsonl"))
    print(json.dumps(metrics))


def cmd_score(args) -> None:
    from vlm_lora.metrics.score import score_predictions_file

    metrics = score_predictions_file(args.predictions)
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


def add_eval_parsers(sub) -> None:
    """Register the ``eval`` and ``score`` subcommands on an argparse subparsers object."""
    p = sub.add_parser("eval", help="caption a data set and score it")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--data", required=True, help="caption JSONL")
    p.add_argument("--image-root")
    p.add_argument("--out", required=True, help="metrics JSON; predictions go beside it")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score existing predictions (no model)")
    p.add_argument("--predictions", required=True, help="JSONL rows {image, prediction, references}")
    p.add_argument("--out")
    p.set_defaults(func=cmd_score)
