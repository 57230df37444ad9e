"""Image-caption data: a JSONL data set and the collator that turns it into LLaVA batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


class DataError(ValueError):
    """A data file or image that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class CaptionExample:
    image_path: Path
    captions: list[str]  # the first is the training target; all are references for eval
    row: int


class CaptionDataset(Dataset):
    """Rows ``{"image": path, "caption": str}`` (or ``"captions": [str, ...]``) of a JSONL file.

    Image paths are relative to ``image_root`` or, by default, to the JSONL's folder. Every
    row is checked when the data set is built, so a missing image fails before training.
    """

    def __init__(self, jsonl: str | Path, image_root: str | Path | None = None):
        self.path = Path(jsonl)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        root = Path(image_root) if image_root else self.path.parent
        self.examples: list[CaptionExample] = []
        problems = []
        for row, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {row}: not JSON ({error.msg})")
                continue
            captions = record.get("captions") or ([record["caption"]] if "caption" in record else [])
            if "image" not in record or not captions:
                problems.append(f"line {row}: needs 'image' and 'caption' (or 'captions') keys")
                continue
            image_path = root / record["image"]
            if not image_path.is_file():
                problems.append(f"line {row}: image not found: {image_path}")
                continue
            self.examples.append(CaptionExample(image_path, [str(c) for c in captions], row))
        if problems:
            shown = "\n  - ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{self.path}: {len(problems)} bad row(s):\n  - {shown}{more}")
        if not self.examples:
            raise DataError(f"{self.path}: no rows")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Image.Image, CaptionExample]:
        example = self.examples[index]
        return load_image(example.image_path, f"{self.path}:{example.row}"), example


def load_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{where}: cannot read image {path}: {error}") from None


def build_prompt(processor, prompt: str) -> str:
    """The generation prompt (user turn with one image, then the assistant cue)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(prompt=prompt)


class CaptionCollator:
    """Batches for training: ``input_ids`` = prompt (with image tokens) + caption + EOS.

    Prompt and answer are tokenized separately and concatenated, so the prompt part is
    exactly what generation sees; labels are ``IGNORE_INDEX`` on the prompt (image tokens
    included) and on padding. Right padding. Returns input_ids/attention_mask/labels [B, T]
    and pixel_values [B, 3, H, W].
    """

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.prompt = build_prompt(processor, prompt)
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set one in the model folder")

    def __call__(self, items: list[tuple[Image.Image, CaptionExample]]) -> dict[str, torch.Tensor]:
        images = [image for image, _ in items]
        encoded = self.processor(images=images, text=[self.prompt] * len(items), return_tensors="pt", padding=True)
        rows, labels = [], []
        for ids, mask, (_, example) in zip(encoded["input_ids"], encoded["attention_mask"], items):
            prompt_ids = ids[mask.bool()].tolist()
            answer = self.tokenizer(" " + example.captions[0], add_special_tokens=False)["input_ids"]
            answer = answer + [self.tokenizer.eos_token_id]
            rows.append(list(prompt_ids) + answer)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for l in labels])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids,
                "pixel_values": encoded["pixel_values"]}
