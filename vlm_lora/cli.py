"""``vlm-lora``: finetune, plan, merge, eval and score from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlm_lora.adapters.export_cli import add_export_parser
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
    if args.gpus:
        from vlm_lora.train.memory import estimate_memory

        print(estimate_memory(model, result, recipe, args.gpus))


def _load_for_plan(recipe):
    from vlm_lora.train.pixels import report_image_tokens
    from vlm_lora.train.setup import load_for_recipe

    model, processor = load_for_recipe(recipe, "cpu")
    line = report_image_tokens(recipe, processor)  # with data.*_pixels: what the budget costs per sample
    if line:
        print(line, file=sys.stderr)
    return model


def cmd_merge(args) -> None:
    from vlm_lora.adapters.merge import merge_adapter, merge_adapters
    from vlm_lora.adapters.merge_options import check_merge_request
    from vlm_lora.adapters.peft_format import AdapterError

    weights = _float_list(args.weights, "--weights") if args.weights else None
    if args.method is None:
        if len(args.adapter) > 1:
            raise AdapterError(f"{len(args.adapter)} adapters need --method (linear, cat, svd, ties, dare_linear, "
                               f"dare_ties, magnitude_prune or slerp)")
        # --rank on a plain merge picks a DyLoRA adapter's first K components (load_adapter refuses other adapters)
        check_merge_request(args.base, args.adapter, args.out, None, weights, args.density, args.t, None,
                            args.seed, args.output)
        report = merge_adapter(args.base, args.adapter[0], args.out, args.dtype, args.force, rank=args.rank)
    else:
        report = merge_adapters(args.base, args.adapter, args.out, args.method, weights, args.density, args.t,
                                args.rank, args.seed, args.output, args.dtype, args.allow_mixed_quantization,
                                args.force)
    print(json.dumps(report))


def cmd_compare(args) -> None:
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train.compare import compare_variants

    recipe = load_recipe(args.recipe, args.set, check_paths=True)
    out = args.out or f"{recipe.output_dir}/compare"
    compare_variants(recipe, [v.strip() for v in args.variants.split(",") if v.strip()], args.steps, out)


def _float_list(text: str, option: str) -> list[float]:
    from vlm_lora.adapters.peft_format import AdapterError

    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise AdapterError(f"{option} takes comma-separated numbers, e.g. 0.7,0.3; got {text!r}") from None


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
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="print the memory estimate per GPU for N GPUs "
                                                                     "(FSDP-sharded when the recipe sets train.fsdp)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="merge an adapter into its base and export a plain model; or combine several "
                                     "adapters (--method) into one adapter or model")
    p.add_argument("--base", required=True, help="base model folder or hub id")
    p.add_argument("--adapter", required=True, action="append", help="adapter folder (PEFT format); repeat to combine")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--method", choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                        "slerp"], help="how to combine several adapters (on the dense deltas)")
    p.add_argument("--weights", help="one weight per adapter, comma-separated (default 1 each)")
    p.add_argument("--density", type=float, help="fraction kept by ties, dare_*, magnitude_prune (default 1)")
    p.add_argument("--t", type=float, help="slerp: 0 = first adapter, 1 = second (default 0.5)")
    p.add_argument("--rank", type=int, help="rank of the re-factored adapter (default: the largest input rank); "
                                            "one DyLoRA adapter: merge its first RANK components")
    p.add_argument("--seed", type=int, help="seed of the DARE masks (default 0)")
    p.add_argument("--as", dest="output", choices=["adapter", "model"],
                   help="write a PEFT adapter (default) or the merged model")
    p.add_argument("--allow-mixed-quantization", action="store_true",
                   help="merge 4-bit-trained with 16-bit-trained adapters (into the 16-bit base)")
    p.add_argument("--force", action="store_true",
                   help="merge even into a base whose weights differ from those the adapter was trained on")
    p.set_defaults(func=cmd_merge)

    add_export_parser(sub)

    p = sub.add_parser("compare", help="train a recipe with several LoRA variants; table and plot side by side")
    p.add_argument("recipe")
    p.add_argument("--variants", default="lora,dora,vera,adalora,dylora", help="comma-separated variants")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per variant")
    p.add_argument("--out", help="folder for the runs, compare.md/json and compare.png (default: OUTPUT_DIR/compare)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_compare)

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
