"""Evaluation tasks beyond captions: ``vqa`` (vqa_accuracy, exact_match, anls) and ``choice``
(choice_accuracy), next to ``caption`` (BLEU, ROUGE-L, CIDEr-D; ``vlm_lora.eval.captioning``).

Each sample's prompt is its own user turn (the question; for choice, the question with its lettered
options); chat rows use their last user turn. Replies are generated as captions are, then scored
against the sample's answers. Prediction rows are ``{image, question, prediction, answers, options?,
score}`` (one model) or carry ``predictions`` and ``scores`` as ``{label: ...}`` (several).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from vlm_lora.data.datasets import DataError
from vlm_lora.data.formats import Problem, format_problems
from vlm_lora.data.video import shown_path
from vlm_lora.metrics.names import DEFAULT_METRIC, TASK_METRICS, TASKS  # noqa: F401  (re-exported)

log = logging.getLogger("vlm_lora")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return task


def question_of(example) -> str:
    """The question as written (QA rows), else the last user turn (chat rows)."""
    return example.question or example.turns[-1][0]


def load_task_data(path: str | Path, task: str, image_root: str | Path | None = None, limit: int | None = None):
    """The eval set of ``task``: caption data as ``load_caption_data``; question rows (or chat rows)
    for vqa/choice, every row checked (choice: ``options`` and an answer among them)."""
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval.coco import is_coco_file, load_caption_data, subset

    if check_task(task) == "caption":
        return load_caption_data(path, image_root, limit)
    if is_coco_file(path):
        raise DataError(f"{path}: a COCO caption file has no questions; --task {task} reads rows "
                        '{"image", "question", "answers": [...]} (or "answer"; choice: also "options")')
    dataset = check_task_rows(load_dataset(path, image_root=image_root), task)
    return subset(dataset, limit) if limit else dataset


def check_task_rows(dataset, task: str):
    """``dataset``, or one ``DataError`` naming every row that task ``task`` cannot score."""
    from vlm_lora.metrics.choice import answer_index

    problems = []
    for example in getattr(dataset, "examples", ()):
        if not example.turns or not example.references:
            problems.append(Problem(example.id, example.where, "needs a question and its answer(s)"))
        elif task == "choice" and not example.options:
            problems.append(Problem(example.id, example.where, "multiple choice needs 'options' in every row"))
        elif task == "choice":
            try:
                answer_index(example.references[0], example.options)
            except ValueError as error:
                problems.append(Problem(example.id, example.where, str(error)))
    if problems:
        raise DataError(format_problems(dataset.path, problems, f"row(s) unusable for task {task}"))
    return dataset


def score_task(task: str, predictions: list[str], answers: list[list[str]],
               options: list[list[str] | None] | None = None) -> tuple[dict, list[float]]:
    """(metrics ``{name: mean, "n"}``, per-sample value of the task's main metric)."""
    from vlm_lora.metrics import anls, choice_accuracy, exact_match, score_captions, vqa_accuracy

    if check_task(task) == "caption":
        metrics = score_captions(predictions, answers, per_sample=True)
        return metrics, [s["cider"] for s in metrics.pop("per_sample")]
    if task == "choice":
        mean, per_sample = choice_accuracy(predictions, options, [a[0] for a in answers])
        return {"choice_accuracy": mean, "n": len(predictions)}, per_sample
    (vqa, per_sample), (em, _), (doc, _) = [f(predictions, answers) for f in (vqa_accuracy, exact_match, anls)]
    return {"vqa_accuracy": vqa, "exact_match": em, "anls": doc, "n": len(predictions)}, per_sample


def answer_rows(dataset, predictions: list[str]) -> list[dict]:
    """One row per sample: ``{image, question, prediction, answers, options?}``."""
    rows = []
    for example, prediction in zip(dataset.examples, predictions):
        row = {"image": shown_path(example), "question": question_of(example), "prediction": prediction,
               "answers": list(example.references)}
        if example.options:
            row["options"] = list(example.options)
        rows.append(row)
    return rows


def score_rows(task: str, rows: list[dict]) -> dict:
    """Metrics of rows as ``evaluate_task`` returns them (e.g. gathered from several ranks)."""
    return score_task(task, [r["prediction"] for r in rows], [r["answers"] for r in rows],
                      [r.get("options") for r in rows])[0]


def generate_replies(model, processor, dataset, batch_size: int = 32, max_new_tokens: int = 32, desc: str = "answering",
                     num_beams: int = 1, min_new_tokens: int = 0, chat_template: str | None = None) -> list[str | None]:
    """One reply per sample to its question (a chat sample: its conversation replayed up to the last user turn,
    ``vlm_lora.eval.prompts``); None where the sample's image could not be loaded (skipped)."""
    from vlm_lora.eval.captioning import generate_captions

    # every question sample has its own user turn, so no shared prompt is asked
    return generate_captions(model, processor, dataset, "", batch_size, max_new_tokens, desc,
                             num_beams=num_beams, min_new_tokens=min_new_tokens, chat_template=chat_template)


def evaluate_task(model, processor, dataset, task: str, batch_size: int = 32, max_new_tokens: int = 32,
                  desc: str = "answering", num_beams: int = 1, min_new_tokens: int = 0,
                  chat_template: str | None = None) -> tuple[dict, list[dict]]:
    """(metrics, rows with a per-sample ``score``) of one model on a vqa or choice data set; rows whose image
    could not be loaded are marked ``skipped`` and not scored."""
    replies = generate_replies(model, processor, dataset, batch_size, max_new_tokens, desc, num_beams, min_new_tokens,
                               chat_template)
    rows = answer_rows(dataset, [r if r is not None else "" for r in replies])
    kept = [i for i, reply in enumerate(replies) if reply is not None]
    metrics, per_sample = score_task(task, [replies[i] for i in kept], [rows[i]["answers"] for i in kept],
                                     [rows[i].get("options") for i in kept])
    for i, value in zip(kept, per_sample):
        rows[i]["score"] = value
    for i in set(range(len(rows))) - set(kept):
        rows[i]["skipped"] = True
    return metrics, rows


def compare_task_models(model, processor, dataset, adapters: list, task: str, batch_size: int = 32,
                        max_new_tokens: int = 32, num_beams: int = 1, min_new_tokens: int = 0,
                        base_label: str = "base") -> tuple[dict, list[dict]]:
    """``compare_models`` for vqa/choice: the base model and each ``(label, adapter_dir)`` in turn.
    Rows carry ``predictions`` and ``scores`` (the task's main metric per sample) by label."""
    from vlm_lora.adapters.peft_format import AdapterError, load_adapter
    from vlm_lora.eval.captioning import _restore, _snapshot_overwritten, activate_adapter, check_adapter_dir

    labels = [base_label] + [label for label, _ in adapters]
    if len(set(labels)) != len(labels):
        raise AdapterError(f"model labels must be unique, got {labels}")
    dirs = [check_adapter_dir(path) for _, path in adapters]
    saved = _snapshot_overwritten(model, dirs)
    summary, replies, scores = {}, {}, {}
    try:
        for i, (label, adapter_dir) in enumerate([(base_label, None), *zip(labels[1:], dirs)]):
            _restore(saved)
            name = None if adapter_dir is None else f"eval_{i}"
            if adapter_dir is not None:
                load_adapter(model, adapter_dir, name)
            activate_adapter(model, name)
            start = time.perf_counter()
            replies[label] = generate_replies(model, processor, dataset, batch_size, max_new_tokens,
                                              f"answering ({label})", num_beams, min_new_tokens)
            seconds = time.perf_counter() - start
            rows = answer_rows(dataset, replies[label])
            metrics, scores[label] = score_task(task, replies[label], [r["answers"] for r in rows],
                                                [r.get("options") for r in rows])
            metrics["speed"] = {"samples_per_s": len(dataset) / seconds, "seconds": seconds,
                                "batch_size": batch_size, "num_beams": num_beams}
            summary[label] = metrics
            log.info("%s: %s; %.2f samples/s", label, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                               if isinstance(v, float)), len(dataset) / seconds)
    finally:
        _restore(saved)
        activate_adapter(model, None)
    rows = answer_rows(dataset, replies[base_label])
    for i, row in enumerate(rows):
        del row["prediction"]
        row["predictions"] = {label: replies[label][i] for label in labels}
        row["scores"] = {label: scores[label][i] for label in labels}
    return summary, rows


def run_task_eval(args, labels: list[str]) -> dict:
    """``vlm-lora eval --task vqa|choice``: every model answers each row's question; scored and reported."""
    import torch

    from vlm_lora.adapters.peft_format import AdapterError, load_adapter
    from vlm_lora.eval.captioning import write_predictions
    from vlm_lora.eval.cli import decoding_settings
    from vlm_lora.eval.pixels import use_adapter_pixels
    from vlm_lora.eval.report import write_outputs
    from vlm_lora.modeling import load_model_and_processor

    if args.mixed_batch:
        raise AdapterError("--mixed-batch is for --task caption")
    data = load_task_data(args.data, args.task, args.image_root, args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model_and_processor(args.model, args.dtype, device)
    use_adapter_pixels(processor, args.adapter)  # the budget they were trained with, if any
    decoding = {k: v for k, v in decoding_settings(args).items() if k != "prompt"}
    out, pairs = Path(args.out), list(zip(labels, args.adapter))
    if out.suffix.lower() == ".json":  # one model: its metrics, its predictions beside them
        if args.adapter:  # (run_eval refused several)
            load_adapter(model, args.adapter[0])
        metrics, rows = evaluate_task(model, processor, data, args.task, **decoding)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        write_predictions(rows, out.with_suffix(".predictions.jsonl"))
        print(json.dumps(metrics))
        return metrics
    summary, rows = compare_task_models(model, processor, data, pairs, args.task, **decoding)
    settings = {"model": args.model, **{f"adapter {label}": path for label, path in pairs},
                "data": f"{args.data} ({len(data)} questions)", "task": args.task,
                "decoding": "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams",
                "prompt": "each row's question" + (" with its lettered options" if args.task == "choice" else ""),
                "device": f"{device}, {args.dtype}", "metrics": ", ".join(TASK_METRICS[args.task])}
    paths = write_outputs(out, summary, rows, settings, args.contact_sheet)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print(json.dumps(summary))
    return summary


def score_task_file(path: str | Path, task: str) -> dict:
    """Metrics of a predictions JSONL of ``task``: one dict, or ``{label: metrics}`` for several models.
    Rows: ``{prediction | predictions: {label: str}, answers | answer, options?}``."""
    from vlm_lora.eval.captioning import read_prediction_rows

    rows = read_prediction_rows(path, "answers")
    for line_no, row in enumerate(rows, start=1):
        options = row["options"]
        if task == "choice" and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
            raise DataError(f"{path}: row {line_no}: --task choice needs 'options' (a list of strings)")
    try:
        scores = {label: score_task(task, [r["predictions"][label] for r in rows], [r["references"] for r in rows],
                                    [r["options"] for r in rows])[0] for label in rows[0]["predictions"]}
    except ValueError as error:  # a choice answer that is not among its options
        raise DataError(f"{path}: {error}") from None
    return scores[""] if list(scores) == [""] else scores
