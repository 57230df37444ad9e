"""Caption a data set with a model (batched greedy decoding) and score it against references."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm_lora.data import CaptionDataset, build_prompt


@torch.no_grad()
def generate_captions(model, processor, dataset: CaptionDataset, prompt: str, batch_size: int = 32,
                      max_new_tokens: int = 32, desc: str = "captioning") -> list[str]:
    """Greedy captions for every example, batched with left padding."""
    tokenizer = processor.tokenizer
    text = build_prompt(processor, prompt)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    captions: list[str] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
            images = [dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            captions += [c.strip() for c in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return captions


def evaluate_captions(model, processor, dataset: CaptionDataset, prompt: str, batch_size: int = 32,
                      max_new_tokens: int = 32, desc: str = "captioning") -> tuple[dict, list[dict]]:
    """(metrics, per-sample rows ``{image, prediction, references}``) for ``dataset``."""
    from vlm_lora.metrics import score_captions

    predictions = generate_captions(model, processor, dataset, prompt, batch_size, max_new_tokens, desc)
    references = [ex.captions for ex in dataset.examples]
    rows = [{"image": str(ex.image_path), "prediction": p, "references": ex.captions}
            for ex, p in zip(dataset.examples, predictions)]
    return score_captions(predictions, references), rows


def write_predictions(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
