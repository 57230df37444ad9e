"""``vlm-lora export``: adapters for vLLM / SGLang (a merged base, engine adapters, serve.sh) or a merged
transformers model; ``--check DIR`` lists the engine rules an adapter folder breaks, one line each."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export adapters that vLLM / SGLang serve (or a merged transformers model); "
                                      "--check an adapter against an engine's rules")
    p.add_argument("--for", dest="engine", choices=["vllm", "sglang", "transformers"],
                   help="the engine; without it, --rank K writes a DyLoRA adapter's first K components as a plain LoRA")
    p.add_argument("--base", help="base model folder or hub id (for --check: optional, enables the family and "
                                  "module-name checks; default: the adapter's base_model_name_or_path if it is a folder)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder (PEFT format); repeat for several "
                                                                  "adapters on one base")
    p.add_argument("--out", help="output folder: base/, adapter/ (or adapters/<name>/), serve.sh")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="of the base")
    p.add_argument("--keep-tower-lora", action="store_true",
                   help="vLLM: serve vision-tower / connector LoRA (--enable-tower-connector-lora) instead of merging it")
    p.add_argument("--force", action="store_true", help="export even if the base's weights differ from those the "
                   "adapter was trained on (same architecture, another checkpoint)")
    p.add_argument("--rank", type=int, help="a DyLoRA adapter: use its first RANK components")
    p.add_argument("--check", metavar="DIR", help="check the adapter in DIR against the engine's rules instead")
    p.add_argument("--max-lora-rank", type=int, help="--check: the engine's --max-lora-rank (vLLM default 16)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from vlm_lora.adapters.peft_format import AdapterError

    if args.engine is None:
        if args.rank is None or args.check or len(args.adapter) != 1 or not args.base or not args.out:
            raise AdapterError("export needs --for vllm|sglang|transformers (or, for a DyLoRA adapter: --base, one "
                               "--adapter, --rank K and --out to write its first K components as a plain LoRA)")
        from vlm_lora.adapters.rank_export import export_at_rank

        print(json.dumps(export_at_rank(args.base, args.adapter[0], args.out, args.rank)))
        return
    if args.check:
        if args.engine == "transformers":
            raise AdapterError("--check applies to --for vllm or --for sglang")
        sys.exit(_check(args))
    if not args.base or not args.adapter or not args.out:
        raise AdapterError("export needs --base, --adapter and --out (or --check DIR)")
    if args.rank is not None:  # a DyLoRA adapter: cut to rank K first, then export that plain LoRA
        import tempfile

        from vlm_lora.adapters.rank_export import export_at_rank

        if len(args.adapter) != 1:
            raise AdapterError("--rank takes one --adapter (a DyLoRA adapter)")
        with tempfile.TemporaryDirectory() as scratch:  # the served adapter is named after the original
            cut = Path(scratch) / f"{Path(args.adapter[0]).name}_rank{args.rank}"
            export_at_rank(args.base, args.adapter[0], cut, args.rank)
            return _export(args, [cut])
    _export(args, args.adapter)


def _export(args, adapters: list) -> None:
    from vlm_lora.adapters.export import describe, export

    report = export(args.base, adapters, args.out, args.engine, args.dtype, args.keep_tower_lora,
                    force=args.force)
    for line in describe(report):
        print(line)
    print(json.dumps(report))


def _check(args) -> int:
    """Print one line per problem (or that the adapter passes); 1 when there are problems."""
    from vlm_lora.adapters.engine_rules import check_adapter, engine_rules
    from vlm_lora.adapters.peft_format import read_adapter_config

    base = args.base or read_adapter_config(args.check).get("base_model_name_or_path")
    model = None
    if base and (args.base or Path(base).is_dir()):
        from vlm_lora.modeling import model_on_meta

        model = model_on_meta(base)
    title = engine_rules(args.engine).title
    problems = check_adapter(args.check, args.engine, model, args.max_lora_rank, args.keep_tower_lora)
    for problem in problems:
        print(f"{args.check}: {problem}")
    if model is None:
        print(f"{args.check}: note: no base folder given (--base): family and module-name checks skipped")
    if not problems:
        print(f"{args.check}: passes {title}'s adapter rules")
    return 1 if problems else 0
