"""Caption a data set with models (batched greedy or beam search) and score it against references.

``evaluate_captions`` scores one model; ``compare_models`` scores the base model and several
adapters in one run, each adapter loaded into the same model under its own name.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vlm_lora.data.datasets import CaptionDataset, DataError
from vlm_lora.data.video import media_batch, shown_path
from vlm_lora.eval.prompts import example_prompts, render_prompt  # noqa: F401 - render_prompt re-exported

log = logging.getLogger("vlm_lora")


@torch.no_grad()
def generate_captions(model, processor, dataset: CaptionDataset, prompt: str, batch_size: int = 32,
                      max_new_tokens: int = 32, desc: str = "captioning", num_beams: int = 1,
                      min_new_tokens: int = 0, chat_template: str | None = None,
                      prompts: list[tuple[str, str]] | None = None) -> list[str | None]:
    """Captions for every example, batched with left padding; greedy, or beam search if ``num_beams > 1``.

    Each example is asked ``prompt``, or a chat example its conversation up to the last user turn
    (``vlm_lora.eval.prompts``; ``prompts``: those already rendered). An example whose image could not be
    loaded (the data set skips it, ``on_bad_sample: skip``) gets None."""
    tokenizer = processor.tokenizer
    prompts = prompts or example_prompts(processor, dataset.examples, prompt, chat_template)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if min_new_tokens:
        decoding["min_new_tokens"] = min_new_tokens
    if is_fsdp_sharded(model):  # every forward gathers weights: ranks that finish keep stepping with the others
        decoding["synced_gpus"] = True
    captions: list[str | None] = []
    try:
        # disable=None: no bar when stderr is not a terminal, so logs stay free of redraw sequences
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False, disable=None):
            indices = range(start, min(start + batch_size, len(dataset)))
            loaded = {i: dataset[i][0] for i in indices}
            found, made = [i for i in indices if loaded[i] is not None], {}
            if found:
                # images and videos (vlm_lora.data.video), one list per prompt
                batch = media_batch(processor, [loaded[i] for i in found], [prompts[i][0] for i in found], device,
                                    dtype)
                out = model.generate(**batch, **decoding)
                decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                made = dict(zip(found, (c.strip() for c in decoded)))
            captions += [made.get(i) for i in indices]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return captions


def is_fsdp_sharded(model) -> bool:
    """True for a model sharded with FSDP2 ``fully_shard`` (its forward is a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def evaluate_captions(model, processor, dataset: CaptionDataset, prompt: str, batch_size: int = 32,
                      max_new_tokens: int = 32, desc: str = "captioning", num_beams: int = 1,
                      min_new_tokens: int = 0, chat_template: str | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample rows ``{image, prompt, prediction, references}``) for ``dataset``.

    ``prompt`` in a row is the user text the model saw; rows of examples whose image could not be loaded
    (skipped) carry ``"skipped": true`` and are left out of the metrics, which count them in ``skipped``."""
    prompts = example_prompts(processor, dataset.examples, prompt, chat_template)
    predictions = generate_captions(model, processor, dataset, prompt, batch_size, max_new_tokens, desc,
                                    num_beams=num_beams, min_new_tokens=min_new_tokens, prompts=prompts)
    rows = [{"image": shown_path(ex), "prompt": user, "prediction": p, "references": ex.captions,
             **({"skipped": True} if p is None else {})}
            for ex, (_, user), p in zip(dataset.examples, prompts, predictions)]
    return score_rows(rows), rows


def score_rows(rows: list[dict]) -> dict:
    """Caption metrics of prediction rows, leaving out (and counting in ``skipped``) the skipped ones."""
    from vlm_lora.metrics import score_captions

    scored = [r for r in rows if not r.get("skipped")]
    if not scored:
        raise DataError(f"no eval sample could be scored: all {len(rows)} were skipped (unreadable images)")
    metrics = score_captions([r["prediction"] for r in scored], [r["references"] for r in scored])
    if len(scored) < len(rows):
        log.warning("eval: skipped %d of %d sample(s) whose image could not be loaded", len(rows) - len(scored),
                    len(rows))
        metrics["skipped"] = len(rows) - len(scored)
    return metrics


def write_predictions(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- several adapters in one model

def activate_adapter(model, name: str | None) -> None:
    """Make adapter ``name`` the only active one on every LoRA layer (``None``: the base model)."""
    from vlm_lora.lora import iter_lora_layers

    for _, layer in iter_lora_layers(model):
        if layer.merged_adapters:
            raise ValueError("cannot switch adapters on a model with merged adapters")
        layer.active_adapters = [name] if name is not None and name in layer.specs else []
        layer.disabled = False


def _snapshot_overwritten(model, adapter_dirs: list[Path]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, CPU copy) for every base parameter that some adapter's fully-trained modules
    (``modules_to_save``) overwrite when loaded, so that it can be restored between adapters."""
    from vlm_lora.adapters.peft_format import PREFIX, WEIGHTS_NAME

    params = dict(model.named_parameters())
    chosen: dict[str, torch.nn.Parameter] = {}
    for adapter_dir in adapter_dirs:
        with safe_open(str(adapter_dir / WEIGHTS_NAME), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if ".lora_A." in key or ".lora_B." in key:
                continue
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name not in params:  # the module may already be wrapped by a LoRA layer
                parent, _, leaf = name.rpartition(".")
                name = f"{parent}.base_layer.{leaf}"
            if name in params:  # otherwise load_adapter reports it
                chosen[name] = params[name]
    return [(p, p.detach().to("cpu", copy=True)) for p in chosen.values()]


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """Fail early (``AdapterError``) on a folder that is not a loadable adapter."""
    from vlm_lora.adapters.peft_format import WEIGHTS_NAME, AdapterError, read_adapter_config

    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    return adapter_dir


def compare_models(model, processor, dataset: CaptionDataset, adapters: list[tuple[str, str | Path]],
                   prompt: str, batch_size: int = 32, max_new_tokens: int = 32, num_beams: int = 1,
                   min_new_tokens: int = 0, base_label: str = "base") -> tuple[dict, list[dict]]:
    """Caption and score ``dataset`` with the base ``model`` and with each ``(label, adapter_dir)``.

    Every adapter is loaded into ``model`` under its own name and evaluated with only it active;
    parameters that adapters overwrite (``modules_to_save``, e.g. the connector) are restored to
    the base values before each load, so every model is scored exactly as if loaded alone.
    Returns ``(summary, rows)``: summary ``{label: metrics + "speed"}``, rows one per image
    ``{image, references, predictions: {label: caption}, cider: {label: per-sample CIDEr-D}}``.
    """
    from vlm_lora.adapters.peft_format import AdapterError, check_adapter_fits, load_adapter
    from vlm_lora.metrics import score_captions

    labels = [base_label] + [label for label, *_ in adapters]
    if len(set(labels)) != len(labels):
        raise AdapterError(f"model labels must be unique, got {labels}")
    dirs = [check_adapter_dir(path) for _, path, *_ in adapters]
    ranks = [rest[0] if rest else None for _, _, *rest in adapters]  # (label, dir, DyLoRA rank) entries
    for adapter_dir in dirs:  # before captioning the base: a misfit fails in seconds, not after a pass
        check_adapter_fits(model, adapter_dir)
    saved = _snapshot_overwritten(model, dirs)
    prompts = example_prompts(processor, dataset.examples, prompt)
    references = [ex.captions for ex in dataset.examples]
    summary: dict = {}
    captions: dict[str, list[str]] = {}
    cider: dict[str, list[float]] = {}
    try:
        for i, (label, adapter_dir, rank) in enumerate([(base_label, None, None), *zip(labels[1:], dirs, ranks)]):
            _restore(saved)
            name = None
            if adapter_dir is not None:
                name = f"eval_{i}"
                load_adapter(model, adapter_dir, name, label=label, rank=rank)
            activate_adapter(model, name)
            start = time.perf_counter()
            captions[label] = generate_captions(model, processor, dataset, prompt, batch_size, max_new_tokens,
                                                desc=f"captioning ({label})", num_beams=num_beams,
                                                min_new_tokens=min_new_tokens, prompts=prompts)
            seconds = time.perf_counter() - start
            metrics = score_captions(captions[label], references, per_sample=True)
            cider[label] = [sample["cider"] for sample in metrics.pop("per_sample")]
            metrics["speed"] = {"samples_per_s": len(dataset) / seconds, "seconds": seconds,
                                "batch_size": batch_size, "num_beams": num_beams}
            summary[label] = metrics
            log.info("%s: %s; %.2f samples/s (%d images in %.1fs)", label, format_metrics(metrics),
                     len(dataset) / seconds, len(dataset), seconds)
    finally:
        _restore(saved)
        activate_adapter(model, None)
    rows = [{"image": shown_path(ex), "prompt": prompts[i][1], "references": ex.captions,
             "predictions": {label: captions[label][i] for label in labels},
             "cider": {label: cider[label][i] for label in labels}}
            for i, ex in enumerate(dataset.examples)]
    return summary, rows


@torch.no_grad()
def generate_captions_mixed(model, processor, dataset: CaptionDataset, names: list[str | None], prompt: str,
                            batch_size: int = 32, max_new_tokens: int = 32, num_beams: int = 1,
                            min_new_tokens: int = 0, prompts: list[tuple[str, str]] | None = None) -> list[list[str]]:
    """Captions of every example by every adapter in ``names`` (None: the base model) in one pass:
    each generate call carries its ``batch_size`` images once per name (rows name-major), routed
    per row with :func:`vlm_lora.adapters.multi.adapter_per_sample`. Returns one list per name.

    As in ``generate_captions``, a chat or video example is asked its conversation up to the last user
    turn (``prompts``: those already rendered)."""
    from vlm_lora.adapters.multi import adapter_per_sample

    tokenizer = processor.tokenizer
    texts = [text for text, _ in prompts or example_prompts(processor, dataset.examples, prompt)]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    first = next(p for p in model.parameters() if p.is_floating_point())
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                    min_new_tokens=min_new_tokens or None, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    captions: list[list[str]] = [[] for _ in names]
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="captioning (mixed)", leave=False, disable=None):
            images = [dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))]
            inputs = media_batch(processor, images, texts[start:start + len(images)], "cpu", first.dtype)  # as above
            inputs = {k: torch.cat([v] * len(names)).to(first.device) for k, v in inputs.items()}
            with adapter_per_sample(model, [name for name in names for _ in images]):
                out = model.generate(**inputs, **decoding)
            decoded = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for m in range(len(names)):
                captions[m] += [c.strip() for c in decoded[m * len(images):(m + 1) * len(images)]]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return captions


def compare_models_mixed(model, processor, dataset: CaptionDataset, adapters: list[tuple[str, str | Path]],
                         prompt: str, batch_size: int = 32, max_new_tokens: int = 32, num_beams: int = 1,
                         min_new_tokens: int = 0, base_label: str = "base") -> tuple[dict, list[dict]]:
    """:func:`compare_models` in one pass over the data: all adapters loaded by name (fully-trained
    connectors as per-adapter deltas), every batch holding each sample once per model. Same
    ``(summary, rows)``; every model's ``speed`` is the shared pass (samples/s counts sample x model)."""
    from vlm_lora.adapters.multi import delete_adapter
    from vlm_lora.adapters.peft_format import AdapterError, load_adapter
    from vlm_lora.metrics import score_captions

    labels = [base_label] + [label for label, *_ in adapters]
    if len(set(labels)) != len(labels):
        raise AdapterError(f"model labels must be unique, got {labels}")
    dirs = [check_adapter_dir(path) for _, path, *_ in adapters]
    names = [None] + [f"eval_{i}" for i in range(1, len(dirs) + 1)]
    try:
        for name, label, adapter_dir in zip(names[1:], labels[1:], dirs):
            load_adapter(model, adapter_dir, name, full_as_delta=True, label=label)
        prompts = example_prompts(processor, dataset.examples, prompt)
        start = time.perf_counter()
        generated = generate_captions_mixed(model, processor, dataset, names, prompt, batch_size, max_new_tokens,
                                            num_beams, min_new_tokens, prompts=prompts)
        seconds = time.perf_counter() - start
    finally:
        for name in names[1:]:
            if any(name in getattr(m, "specs", {}) for m in model.modules()):
                delete_adapter(model, name)
    references = [ex.captions for ex in dataset.examples]
    speed = {"samples_per_s": len(dataset) * len(names) / seconds, "seconds": seconds, "batch_size": batch_size,
             "num_beams": num_beams, "mixed_batch": True}
    summary, cider = {}, {}
    for label, captions in zip(labels, generated):
        metrics = score_captions(captions, references, per_sample=True)
        cider[label] = [sample["cider"] for sample in metrics.pop("per_sample")]
        summary[label] = {**metrics, "speed": speed}
        log.info("%s: %s", label, format_metrics(metrics))
    log.info("mixed batches: %.2f samples/s (%d images x %d models in %.1fs)", speed["samples_per_s"], len(dataset),
             len(names), seconds)
    rows = [{"image": shown_path(ex), "prompt": prompts[i][1], "references": ex.captions,
             "predictions": {label: captions[i] for label, captions in zip(labels, generated)},
             "cider": {label: cider[label][i] for label in labels}}
            for i, ex in enumerate(dataset.examples)]
    return summary, rows


@torch.no_grad()
def _restore(saved: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for param, value in saved:
        param.copy_(value)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items() if not isinstance(v, dict))


# ---------------------------------------------------------------- scoring prediction files

def meteor_spice_note() -> str:
    """One line saying why METEOR and SPICE are not in the scores."""
    from vlm_lora.metrics import meteor_spice_available

    if meteor_spice_available():
        return ("METEOR and SPICE skipped: Java and pycocoevalcap's jars are installed, but vlm-lora does not "
                "run Java (run pycocoevalcap on the predictions for them)")
    return "METEOR and SPICE skipped: they need Java and pycocoevalcap's jars, which were not found"


def read_prediction_rows(path: str | Path, reference_key: str = "references") -> list[dict]:
    """Rows of a predictions JSONL: ``{image, prediction, references}`` (one model) or
    ``{image, predictions: {label: caption}, references}`` (several, as ``vlm-lora eval`` writes).
    Returned as ``{references, predictions, options}``; ``reference_key="answers"`` reads QA rows
    (``answers``, or one ``answer``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_no}: not JSON ({error.msg})") from None
        if isinstance(row, dict) and row.get("skipped"):  # its image could not be loaded: no prediction
            continue
        refs = row.get(reference_key, row.get(reference_key[:-1])) if isinstance(row, dict) else None
        refs = [refs] if isinstance(refs, str) and reference_key == "answers" else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}:{line_no}: {reference_key!r} must be a non-empty list of strings")
        preds = row.get("predictions", {"": row.get("prediction")})
        if not isinstance(preds, dict) or not all(isinstance(p, str) for p in preds.values()):
            raise DataError(f"{path}:{line_no}: needs 'prediction' (a string) or 'predictions' ({{label: string}})")
        if rows and set(preds) != set(rows[0]["predictions"]):
            raise DataError(f"{path}:{line_no}: models {sorted(preds)} differ from line 1's {sorted(rows[0]['predictions'])}")
        rows.append({"references": refs, "predictions": preds, "options": row.get("options")})
    if not rows:
        raise DataError(f"{path}: no rows to score")
    return rows


def score_prediction_file(path: str | Path) -> dict:
    """Metrics of a predictions JSONL: one metrics dict, or ``{label: metrics}`` for several models."""
    from vlm_lora.metrics import score_captions

    rows = read_prediction_rows(path)
    references = [row["references"] for row in rows]
    scores = {label: score_captions([row["predictions"][label] for row in rows], references)
              for label in rows[0]["predictions"]}
    return scores[""] if list(scores) == [""] else scores
