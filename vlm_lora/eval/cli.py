"""``vlm-lora eval`` and ``vlm-lora score``: caption a data set with models, score predictions.

``vlm-lora eval --model BASE --adapter A --adapter B --data GT --out DIR`` scores the base model
and every adapter in one run and writes ``DIR/summary.json``, ``predictions.jsonl``,
``report.html`` and ``contact_sheet.png``. ``--out FILE.json`` keeps the older single-model
form: metrics JSON plus ``FILE.predictions.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("vlm_lora")
TASKS = ("caption", "vqa", "choice")  # vlm_lora.eval.tasks.TASKS, kept here so --help imports nothing heavy


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def model_labels(adapters: list[str], names: list[str] | None, base_label: str = "base") -> list[str]:
    """One label per adapter: ``names`` if given, else the adapter paths as typed."""
    from vlm_lora.adapters.peft_format import AdapterError

    labels = list(names) if names else [str(Path(a)) for a in adapters]
    if len(labels) != len(adapters):
        raise AdapterError(f"--names gives {len(labels)} label(s) for {len(adapters)} adapter(s)")
    if base_label in labels or len(set(labels)) != len(labels):
        raise AdapterError(f"model labels must be unique and not {base_label!r}: {labels}")
    return labels


def decoding_settings(args) -> dict:
    return dict(prompt=args.prompt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams, min_new_tokens=args.min_new_tokens)


def run_eval(args) -> dict:
    """Run ``vlm-lora eval`` from parsed arguments; returns what was written as metrics."""
    import torch

    from vlm_lora.adapters.peft_format import AdapterError, load_adapter
    from vlm_lora.eval.coco import load_caption_data
    from vlm_lora.eval.captioning import (check_adapter_dir, compare_models, compare_models_mixed, evaluate_captions,
                                          format_metrics, meteor_spice_note, write_predictions)
    from vlm_lora.eval.pixels import use_adapter_pixels
    from vlm_lora.modeling import load_model_and_processor

    out = Path(args.out)
    single_file = out.suffix.lower() == ".json"
    if args.mixed_batch and (single_file or not args.adapter):
        raise AdapterError("--mixed-batch needs at least one --adapter and an output folder (not FILE.json)")
    if single_file and len(args.adapter) > 1:
        raise AdapterError("--out FILE.json takes at most one adapter; give a folder to compare several")
    labels = model_labels(args.adapter, args.names)
    for adapter in args.adapter:
        check_adapter_dir(adapter)
    ranks = [int(k) for k in args.rank.split(",")] if getattr(args, "rank", None) else []
    if ranks and (args.mixed_batch or not args.adapter or (single_file and len(ranks) > 1)):
        raise AdapterError("--rank needs DyLoRA --adapter(s), without --mixed-batch; several ranks need an output folder")
    if args.task != "caption":
        if ranks:
            raise AdapterError("--rank (DyLoRA ranks) is supported with --task caption only")
        from vlm_lora.eval.tasks import run_task_eval

        return run_task_eval(args, labels)
    data = load_caption_data(args.data, args.image_root, args.limit, args.prompt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log.info("loading %s (%s) on %s; %d images from %s", args.model, args.dtype, device, len(data), args.data)
    model, processor = load_model_and_processor(args.model, args.dtype, device)
    use_adapter_pixels(processor, args.adapter)  # the budget they were trained with, if any
    decoding = decoding_settings(args)

    if single_file:
        if args.adapter:
            load_adapter(model, args.adapter[0], rank=ranks[0] if ranks else None)
        start = time.perf_counter()
        metrics, rows = evaluate_captions(model, processor, data, **decoding)
        seconds = time.perf_counter() - start
        log.info("%s; %.2f samples/s (%d images in %.1fs, scoring included)", format_metrics(metrics),
                 len(data) / seconds, len(data), seconds)
        log.info(meteor_spice_note())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        write_predictions(rows, out.with_suffix(".predictions.jsonl"))
        print(json.dumps(metrics))
        return metrics

    from vlm_lora.eval.report import write_outputs

    compare = compare_models_mixed if args.mixed_batch else compare_models
    models = list(zip(labels, args.adapter))
    if ranks:  # DyLoRA: every adapter at every rank, one table
        models = [(f"{label}@r{k}", path, k) for label, path in models for k in ranks]
    summary, rows = compare(model, processor, data, models, **decoding)
    settings = {
        "model": args.model,
        **{f"adapter {label}": path for label, path in zip(labels, args.adapter)},
        "data": f"{args.data} ({len(data)} images)",
        "decoding": "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams",
        "new tokens": f"{args.min_new_tokens} to {args.max_new_tokens}",
        "prompt": args.prompt,
        "batch size": args.batch_size,
        **({"mixed batch": "one pass, each batch carries every image once per model"} if args.mixed_batch else {}),
        "device": f"{device}, {args.dtype}",
        "metrics": "BLEU-1..4, ROUGE-L, CIDEr-D (PTB-tokenized, equal to pycocoevalcap); " + meteor_spice_note(),
    }
    paths = write_outputs(out, summary, rows, settings, args.contact_sheet)
    log.info(meteor_spice_note())
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print(json.dumps(summary))
    return summary


def cmd_eval(args) -> None:
    run_eval(args)


def cmd_score(args) -> None:
    from vlm_lora.eval.captioning import meteor_spice_note, score_prediction_file
    from vlm_lora.eval.tasks import score_task_file

    if args.task != "caption":
        metrics = score_task_file(args.predictions, args.task)
    else:
        metrics = score_prediction_file(args.predictions)
        print(meteor_spice_note(), file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` options (shared by ``vlm-lora eval`` and ``scripts/eval_captions.py``)."""
    p.add_argument("--model", required=True, help="base model folder or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter folder; repeat to compare several (the base model is always scored)")
    p.add_argument("--names", nargs="+", action="extend", metavar="LABEL", help="one label per --adapter")
    p.add_argument("--rank", metavar="K[,K...]", help="DyLoRA adapters: score each at these ranks (first K components)")
    p.add_argument("--data", required=True,
                   help="ground truth: COCO caption JSON ({images, annotations}) or JSONL ({image, caption(s)}); "
                        "--task vqa/choice: JSONL {image, question, answers | answer, options?} or chat rows")
    p.add_argument("--task", choices=TASKS, default="caption",
                   help="caption: BLEU/ROUGE-L/CIDEr-D; vqa: vqa_accuracy, exact_match, anls; choice: choice_accuracy")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--limit", type=_positive, help="only the first N images")
    p.add_argument("--out", required=True,
                   help="output folder (summary.json, predictions.jsonl, report.html, contact_sheet.png); "
                        "FILE.json: one model's metrics, predictions beside it")
    p.add_argument("--prompt", default="Describe the image.",
                   help="instruction put into the chat template; with the image token (<image>) it is the "
                        "full template, used verbatim")
    p.add_argument("--num-beams", type=_positive, default=1, help="1: greedy; more: beam search")
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    p.add_argument("--min-new-tokens", type=_non_negative, default=0)
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--mixed-batch", action="store_true",
                   help="score the base and all adapters in one pass: every batch carries each image once per "
                        "model, each row routed to its adapter (same captions as one model at a time)")
    p.add_argument("--contact-sheet", type=_non_negative, default=16, metavar="N",
                   help="images on contact_sheet.png")


def add_eval_parsers(sub) -> None:
    """Register the ``eval`` and ``score`` subcommands on an argparse subparsers object."""
    p = sub.add_parser("eval", help="caption a data set with the base model and adapters, score and report")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score existing predictions (no model)")
    p.add_argument("--predictions", required=True,
                   help="JSONL rows {image, prediction, references} or {image, predictions: {label: caption}, references}")
    p.add_argument("--task", choices=TASKS, default="caption",
                   help="caption: rows {prediction(s), references}; vqa/choice: {prediction(s), answers, options?}")
    p.add_argument("--out", help="metrics JSON: bleu1..bleu4, rougeL, cider, n (per label for several models)")
    p.set_defaults(func=cmd_score)
