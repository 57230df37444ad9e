"""``vlm-lora``: finetune, plan, merge, eval and score from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("vlm_lora")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_finetune(args) -> None:
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import finetune

    finetune(load_recipe(args.recipe, args.set))


def cmd_plan(args) -> None:
    from vlm_lora.modeling import load_model_and_processor
    from vlm_lora.planner import plan
    from vlm_lora.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    model, _ = load_model_and_processor(recipe.model.path, recipe.model.dtype)
    result = plan(model, recipe.strategy, recipe.components)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)


def cmd_merge(args) -> None:
    from vlm_lora.merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, args.dtype)
    print(json.dumps(report))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("plan", help="show which modules get what, without training")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="merge an adapter into its base and export a plain model")
    p.add_argument("--base", required=True, help="base model folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_merge)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlm_lora.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"vlm-lora {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
