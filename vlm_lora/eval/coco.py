"""Evaluation ground truth: COCO-format caption JSON as well as the caption JSONL.

COCO format (as in ``captions_val2014.json``)::

    {"images": [{"id": 1, "file_name": "a.jpg"}, ...],
     "annotations": [{"image_id": 1, "caption": "..."}, ...]}

Every caption of an image becomes one of its references. Images keep the order of
``images``; images without any caption are skipped (with a warning), as COCO's evaluation
only scores images that have references.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from vlm_lora.data.datasets import DEFAULT_PROMPT, CaptionDataset, CaptionExample, DataError

log = logging.getLogger("vlm_lora")


class CocoCaptionDataset(CaptionDataset):
    """A ``CaptionDataset`` read from a COCO-format caption file.

    Image paths are ``file_name`` relative to ``image_root`` or, by default, to the JSON's folder.
    ``CaptionExample.row`` is the image's 1-based position in ``images``. (Fills the same fields
    as ``CaptionDataset.__init__``, which reads JSONL, so it does not call it.)
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{self.path}: not JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DataError(f"{self.path}: a COCO caption file needs 'images' and 'annotations' lists")
        root = Path(image_root) if image_root else self.path.parent
        problems: list[str] = []
        files: dict = {}  # image id -> (position, file_name)
        for pos, image in enumerate(data["images"], start=1):
            if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
                problems.append(f"images[{pos - 1}]: needs 'id' and 'file_name'")
            elif image["id"] in files:
                problems.append(f"images[{pos - 1}]: duplicate id {image['id']!r}")
            else:
                files[image["id"]] = (pos, image["file_name"])
        captions: dict = {image_id: [] for image_id in files}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
                problems.append(f"annotations[{i}]: needs 'image_id' and a string 'caption'")
            elif ann["image_id"] not in captions:
                problems.append(f"annotations[{i}]: image_id {ann['image_id']!r} is not in 'images'")
            else:
                captions[ann["image_id"]].append(ann["caption"])
        self.examples: list[CaptionExample] = []
        skipped = 0
        for image_id, (pos, file_name) in files.items():
            if not captions[image_id]:
                skipped += 1
                continue
            image_path = root / file_name
            if not image_path.is_file():
                problems.append(f"image {image_id!r}: not found: {image_path}")
                continue
            self.examples.append(CaptionExample(image_path, captions[image_id], pos))
        if problems:
            shown = "\n  - ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{self.path}: {len(problems)} problem(s):\n  - {shown}{more}")
        if skipped:
            log.warning("%s: skipped %d image(s) without captions", self.path, skipped)
        if not self.examples:
            raise DataError(f"{self.path}: no images with captions")


def is_coco_file(path: str | Path) -> bool:
    """``.json`` means COCO, ``.jsonl`` means JSONL; otherwise look for a top-level ``annotations`` object."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() == ".jsonl" or not path.is_file():
        return False
    text = path.read_text(encoding="utf-8").lstrip()
    if not text.startswith("{"):
        return False
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False  # several JSON lines
    return isinstance(data, dict) and "annotations" in data and "images" in data


def load_caption_data(path: str | Path, image_root: str | Path | None = None,
                      limit: int | None = None, prompt: str = DEFAULT_PROMPT) -> CaptionDataset:
    """The evaluation set at ``path`` (COCO JSON or JSONL), optionally only its first ``limit`` images;
    ``prompt`` is what each image is asked."""
    dataset = CocoCaptionDataset(path, image_root) if is_coco_file(path) else CaptionDataset(path, image_root, prompt)
    return subset(dataset, limit) if limit else dataset


def subset(dataset: CaptionDataset, limit: int) -> CaptionDataset:
    """A shallow copy of ``dataset`` holding only its first ``limit`` examples."""
    if limit < 1:
        raise DataError(f"{dataset.path}: limit must be at least 1, got {limit}")
    small = copy.copy(dataset)
    small.examples = dataset.examples[:limit]
    return small
