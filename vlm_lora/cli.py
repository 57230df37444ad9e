"""``vlm-lora``: finetune, plan, merge, eval and score from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlm_lora.eval.cli import add_eval_parsers

log = logging.getLogger("vlm_lora")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_finetune(args) -> None:
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import finetune

    finetune(load_recipe(args.recipe, args.set, check_paths=True), resume=args.resume, overwrite=args.overwrite)


def cmd_plan(args) -> None:
    from vlm_lora.modeling import model_on_meta
    from vlm_lora.planner import plan
    from vlm_lora.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    model = model_on_meta(recipe.model.path, recipe.model.trust_remote_code) if args.meta else _load_for_plan(recipe)
    result = plan(model, recipe.strategy, recipe.components)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)


def _load_for_plan(recipe):
    from vlm_lora.train.setup import load_for_recipe

    return load_for_recipe(recipe, "cpu")[0]


def cmd_merge(args) -> None:
    from vlm_lora.adapters.merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, args.dtype)
    print(json.dumps(report))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("plan", help="show which modules get what, without training")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--meta", action="store_true", help="build the model from its config on the meta device (no weights)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="merge an adapter into its base and export a plain model")
    p.add_argument("--base", required=True, help="base model folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_merge)

    add_eval_parsers(sub)
    return parser


def run_reporting_errors(prog: str, func, args) -> int:
    """Run ``func(args)``; bad input (recipe, data, adapter, ...) becomes one line on stderr and exit 2."""
    from vlm_lora.errors import USER_ERRORS

    setup_logging()
    try:
        func(args)
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"vlm-lora {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
