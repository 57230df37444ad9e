"""Readers for the training data formats; every row becomes a ``Sample`` or a ``Problem``.

Formats (``format=`` or inferred by ``infer_format``):

* ``caption_jsonl``: one JSON object per line, ``{"image": path, "caption": str}`` (or ``"captions": [str, ...]``;
  ``"images": [path, ...]``: several images, all shown in the one turn); chat ``messages`` rows read here too,
  and question rows ``{"image", "question", "answer(s)", "options"?}`` (``vlm_lora.data.qa``).
* ``caption_csv``: a CSV with a header holding ``image`` and ``caption`` columns.
* ``llava_json``: a JSON list (or JSONL) of ``{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; multi-turn; ``<image>`` is stripped from the text.
  ``"image": [path, ...]`` is a multi-image sample: its ``<image>`` markers (one per image) say which turn
  shows which images; without markers they all go to the first turn.
* ``imagefolder``: a folder with ``metadata.jsonl`` (or ``metadata.csv``) rows ``{"file_name", "text" | "caption"}``.
Any row may name videos (``"video"``, video parts): ``vlm_lora.data.video_rows``.

Parquet, saved/Hub HF datasets and WebDataset shards are read by ``vlm_lora.data.sources``; their rows go
through ``record_sample`` here, which also reads the chat-messages rows of the HF ecosystem
(``{"messages": [{"role", "content": [{"type": "image"}, {"type": "text", "text"}]}], "images": [...]}``, images
also on a message or inline in its parts: ``vlm_lora.data.messages``).

Image paths are relative to ``image_root`` or, by default, to the data file's folder (the folder itself
for ``imagefolder``). Images are checked here: missing or unreadable ones (PIL ``verify``) become problems.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from vlm_lora.data.messages import EmbeddedBytes, chat_conversation, message_images
from vlm_lora.data.video_rows import has_video, video_sample

FORMATS = ("caption_jsonl", "caption_csv", "llava_json", "imagefolder")
DEFAULT_PROMPT = "Describe the image."
IMAGE_KEYS = ("image", "file_name")
CAPTION_KEYS = ("caption", "captions", "text")
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")
SHOWN_PROBLEMS = 20


class DataError(ValueError):
    """A data file or image that cannot be used; the message names the file and row."""


class Problem(NamedTuple):
    """One bad sample: its id, where it is (``"line 3"``, ``"item 2 (id 'a')"``) and why."""

    id: Any
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Sample:
    """One training/eval example: an image (or several, or none) and a conversation about it.

    ``turns`` are ``(user_text, assistant_text)`` pairs (caption data: one ``(prompt, caption)``);
    ``references`` are the texts an eval scores against (all captions; LLaVA: the last answer).
    """

    id: Any  # the line number (caption formats) or the LLaVA id (else its 1-based position)
    image_path: Path | None  # None (and no ``image_source``): no image (text-only, or video-only: ``videos``)
    turns: list[tuple[str, str]]
    references: list[str]
    label: Any = None
    system: str | None = None
    row: int = 0  # 1-based line (JSONL/CSV) or position in the JSON list
    where: str = ""
    image_size: tuple[int, int] | None = field(default=None, compare=False)  # (width, height), set when checked
    image_source: Any = field(default=None, compare=False)  # embedded image (``.read() -> bytes``); None: a file
    # multi-image samples: images 2..n (paths, or embedded sources with ``.open()``) and how many images each
    # user turn shows (sums to 1 + len(extra_images)); None: the one image, in the first turn
    extra_images: list = field(default_factory=list, compare=False)
    image_turns: list[int] | None = None
    question: str | None = None  # QA rows (``vlm_lora.data.qa``): the question as written; else the last user turn
    options: list[str] | None = None  # multiple-choice rows: the options, lettered A, B, ... in the prompt
    videos: list = field(default_factory=list, compare=False)  # ``vlm_lora.data.video.VideoRef``s, turn order
    video_turns: list[int] | None = None  # videos each user turn shows (after its images)

    @property
    def n_images(self) -> int:
        return (self.image_path is not None or self.image_source is not None) + len(self.extra_images)

    @property
    def text_only(self) -> bool:
        return self.image_path is None and self.image_source is None and not self.videos

    @property
    def captions(self) -> list[str]:
        """``references`` under the name the caption evaluation uses."""
        return self.references


def format_problems(path: Path | str, problems: list[Problem], what: str = "bad row(s)") -> str:
    """One message for a ``DataError``: the first problems in full, then the ids of all the others."""
    lines = [str(p) for p in problems[:SHOWN_PROBLEMS]]
    rest = problems[SHOWN_PROBLEMS:]
    if rest:
        lines.append(f"... and {len(rest)} more: " + ", ".join(p.where for p in rest))
    return f"{path}: {len(problems)} {what}:\n  - " + "\n  - ".join(lines)


def infer_format(path: Path) -> str:
    """A folder is an imagefolder, ``.csv`` is caption CSV, ``.json`` is LLaVA; else look at the first row."""
    if path.is_dir():
        return "imagefolder"
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "caption_csv"
    if suffix == ".json":
        return "llava_json"
    first = _first_line(path)
    if first.startswith("["):
        return "llava_json"
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return "caption_jsonl"  # the reader reports the bad line
    return "llava_json" if isinstance(record, dict) and "conversations" in record else "caption_jsonl"


def read_samples(path: str | Path, format: str = "auto", image_root: str | Path | None = None,
                 prompt: str = DEFAULT_PROMPT, label_key: str = "label") -> tuple[str, list[Sample], list[Problem]]:
    """(format, samples with a readable image, problems) for every row of the data at ``path``.

    File-level errors (no file, not JSON at all, no rows) raise ``DataError``; a bad row (malformed,
    image missing or unreadable) is a ``Problem`` for the caller's ``on_bad_sample`` policy.
    """
    path = Path(path)
    fmt = infer_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if fmt == "imagefolder":
        path = _metadata_file(path)
        root = Path(image_root) if image_root else path.parent
        records = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    else:
        if path.is_dir():
            raise DataError(f"{path} is a folder; format {fmt} needs a file")
        root = Path(image_root) if image_root else path.parent
        if fmt == "caption_csv":
            records = _read_csv(path)
        elif fmt == "llava_json" and not _looks_like_jsonl(path):
            records = _read_json_list(path)
        else:
            records = _read_jsonl(path)
    rows = []
    for row, where, record in records:
        if isinstance(record, Problem):
            rows.append(record)
        elif fmt == "llava_json" and not has_video(record):
            rows.append(_llava_sample(record, row, where, root, label_key))
        else:  # caption rows; a JSONL of chat ``messages`` rows reads here too
            rows.append(record_sample(record, row, where, root, prompt, label_key))
    if not rows:
        raise DataError(f"{path}: no rows")
    from vlm_lora.data.image_check import check_images  # it builds on this module's Sample and Problem

    samples, problems = check_images(rows)
    return fmt, samples, problems


# ---------------------------------------------------------------- files -> (row, where, record)

def _metadata_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path}: an imagefolder needs a metadata.jsonl (or metadata.csv) with file_name and text")


def _first_line(path: Path) -> str:
    """The first non-blank line of a text data file; a compressed or binary file is a ``DataError``."""
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        raise DataError(f"{path}: a gzip-compressed file, not a data file of {', '.join(FORMATS)}; WebDataset "
                        "shards must be uncompressed .tar (decompress with `gunzip -k`)")
    try:
        with path.open(encoding="utf-8") as f:
            return next((line.strip() for line in f if line.strip()), "")
    except UnicodeDecodeError as error:
        raise _not_text(path, error) from None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _not_text(path, error) from None


def _not_text(path: Path, error: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text (byte {error.start}), so not a data file of {', '.join(FORMATS)}; "
                     "parquet, HF datasets and .tar shards are read by their extension or data.format")


def _looks_like_jsonl(path: Path) -> bool:
    return _first_line(path).startswith("{")


def _read_jsonl(path: Path) -> list:
    records = []
    for row, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((row, f"line {row}", json.loads(line)))
        except json.JSONDecodeError as error:
            records.append((row, f"line {row}", Problem(row, f"line {row}", f"not JSON ({error.msg})")))
    return records


def _read_csv(path: Path) -> list:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (Excel) is not part of the header
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (expected a header with image and caption columns)")
        records, start = [], reader.line_num + 1
        for record in reader:
            records.append((start, f"line {start}", {k: v for k, v in record.items() if k and v not in (None, "")}))
            start = reader.line_num + 1
    return records


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, list):
        hint = " (this looks like COCO captions, which only evaluation reads)" \
            if isinstance(data, dict) and "annotations" in data else ""
        raise DataError(f"{path}: LLaVA data is a JSON list of {{id, image, conversations}} records{hint}")
    return [(pos, f"item {pos}", record) for pos, record in enumerate(data, start=1)]


# ---------------------------------------------------------------- records -> Sample | Problem

def record_sample(record: Any, row: int, where: str, root: Path, prompt: str, label_key: str,
                  image: Any = None, videos_read: bool = False) -> Sample | Problem:
    """A row of any schema: chat ``messages``, LLaVA ``conversations``, else caption keys.

    ``image``: the row's image (or list of images) when the caller resolved it (embedded); else the row's
    ``image``/``images``/``file_name`` path (or list of paths), relative to ``root``. Images inside the
    messages (``vlm_lora.data.messages``) take the row-level ones' places. ``videos_read``: the row's videos
    were taken out already (``vlm_lora.data.video_rows``)."""
    from vlm_lora.data.qa import attach_options, qa_sample  # qa builds on this module's Sample

    if not isinstance(record, dict):
        return Problem(row, where, "expected a JSON object")
    if image is None and not videos_read and has_video(record):
        return video_sample(record, row, where, root, lambda rest: record_sample(rest, row, where, root, prompt,
                                                                                 label_key, videos_read=True))
    images = None  # the row's images when resolved here or by the caller: paths and embedded sources
    if image is not None:
        images = image if isinstance(image, list) else [image]
    elif isinstance(record.get("images"), list) and "image" not in record:
        record = {**record, "image": record["images"]}
    if "messages" in record:
        parsed = chat_conversation(record["messages"])
        if isinstance(parsed, str):
            return Problem(row, where, parsed)
        conversation, inline = parsed
        record = {**record, "conversations": conversation}
        if any(value is not None for value in inline):
            images = message_images(inline, images, record.get("image"), root)
            if isinstance(images, str):
                return Problem(row, where, images)
    if images is not None:
        record = {**record, "image": ["<embedded>"] * len(images)}
    if "conversations" in record:
        sample = _llava_sample(record, row, where, root, label_key)
        if isinstance(sample, Sample) and "options" in record:
            sample = attach_options(sample, record)
    elif "question" in record:
        sample = qa_sample(record, row, where, root, label_key)
    else:
        sample = _caption_sample(record, row, where, root, prompt, label_key)
    if images is not None and isinstance(sample, Sample):
        first = images[0]
        sample.image_path, sample.image_source = (first, None) if isinstance(first, Path) else (Path(where), first)
        sample.extra_images = images[1:]
    return sample


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    return next((record[k] for k in keys if record.get(k) not in (None, "", [])), None)


def _caption_sample(record: Any, row: int, where: str, root: Path, prompt: str, label_key: str) -> Sample | Problem:
    if not isinstance(record, dict):
        return Problem(row, where, "expected a JSON object")
    image, captions = _first(record, IMAGE_KEYS), _first(record, CAPTION_KEYS)
    images = image if isinstance(image, list) else [image]
    image = images[0] if images else None
    label = record.get(label_key)
    if isinstance(captions, str):
        captions = [captions]
    if image is not None and not all(isinstance(i, str) for i in images):
        return Problem(row, where, f"'image' must be a path (or a list of paths), not {type(image).__name__}")
    if image is None and isinstance(captions, (str, list)) and captions:  # text-only: the prompt, then the caption
        images = []
    elif not images or not all(isinstance(i, str) for i in images) or (captions is None and label is None):
        return Problem(row, where, "needs 'image' and 'caption' (or 'captions') keys "
                                   "('file_name' and 'text' in an imagefolder)")
    if captions is not None and (not isinstance(captions, list) or not all(isinstance(c, str) and c for c in captions)):
        return Problem(row, where, "'captions' must be a list of non-empty strings")
    captions = captions or []
    turns = [(prompt, captions[0])] if captions else []
    return Sample(row, root / image if images else None, turns, list(captions), label=label, row=row, where=where,
                  extra_images=[root / i for i in images[1:]], image_turns=[len(images)] if len(images) != 1 else None)


def _llava_sample(record: Any, row: int, where: str, root: Path, label_key: str) -> Sample | Problem:
    if not isinstance(record, dict):
        return Problem(row, where, "expected a JSON object")
    sid = record.get("id", row)
    if "id" in record:
        where = f"{where} (id {sid!r})"
    image = record.get("image")
    images = [] if image is None else image if isinstance(image, list) else [image]  # none: a text-only sample
    if not all(isinstance(i, str) for i in images):
        return Problem(sid, where, "'image' must be a path (or a list of paths)")
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not all(
            isinstance(m, dict) and isinstance(m.get("value"), str) and isinstance(m.get("from"), str)
            for m in conversation):
        return Problem(sid, where, "needs 'conversations': a list of {from, value} messages")
    system = None
    if conversation and conversation[0]["from"].lower() == "system":
        system, conversation = conversation[0]["value"], conversation[1:]
    turns, markers = [], []
    for i in range(0, len(conversation), 2):
        pair = conversation[i:i + 2]
        roles = [m["from"].lower() for m in pair]
        if len(pair) < 2 or roles[0] not in USER_ROLES or roles[1] not in ASSISTANT_ROLES:
            return Problem(sid, where, f"conversation must alternate human/gpt and end with gpt "
                                       f"(message {i + 1} onwards: {roles})")
        if "<image>" in pair[1]["value"]:
            return Problem(sid, where, f"message {i + 2 + (system is not None)} ({pair[1]['from']}) holds an image; "
                                       "images go in user turns")
        turns.append((pair[0]["value"].replace("<image>", "").strip(), pair[1]["value"].strip()))
        markers.append(pair[0]["value"].count("<image>"))
    if not turns:
        return Problem(sid, where, "empty conversation")
    if sum(markers) not in (0, len(images)):
        return Problem(sid, where, f"{len(images)} image(s) but {sum(markers)} <image> markers in the user turns; "
                                   "put one <image> per image (or none: all images go to the first turn)")
    image_turns = None
    if not images:
        image_turns = [0] * len(turns)
    elif len(images) > 1:
        image_turns = markers if sum(markers) else [len(images)] + [0] * (len(turns) - 1)
    return Sample(sid, root / images[0] if images else None, turns, [turns[-1][1]], label=record.get(label_key),
                  system=system,
                  row=row, where=where, extra_images=[root / i for i in images[1:]], image_turns=image_turns)
