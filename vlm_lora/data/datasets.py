"""Training data sets: image + conversation samples (``load_dataset``).

``load_dataset`` reads any format of ``vlm_lora.data.formats`` or ``vlm_lora.data.sources`` into a
``ConversationDataset``, or WebDataset shards into a ``ShardStream``; bad samples (malformed rows,
missing or unreadable image files) are found when it is built: all reported in one ``DataError``,
or skipped and counted (``dataset.skipped``) with ``on_bad_sample="skip"``. Embedded images (parquet,
HF datasets, tar shards) are decoded only when a sample is loaded, so a corrupt one is found then.

The collator that turns them into batches lives in ``vlm_lora.data.collate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vlm_lora.data.formats import DEFAULT_PROMPT, DataError, Problem, Sample, format_problems, read_samples
from vlm_lora.data.image_check import check_images
from vlm_lora.data.sources import check_shard, iter_shard, read_source, shard_paths, source_format
from vlm_lora.data.video import order_media

__all__ = ["IGNORE_INDEX", "DEFAULT_PROMPT", "DataError", "Problem", "Sample", "CaptionExample",
           "ConversationDataset", "CaptionDataset", "ShardStream", "load_dataset", "load_image"]

log = logging.getLogger("vlm_lora")
IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
# used for processors that need the image placeholder in the text but have no chat template (LLaVA-1.5 style)
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
ON_BAD_SAMPLE = ("error", "skip")
STREAMING = ("auto", True, False)  # auto: tar shards stream, everything else is map-style


@dataclass(frozen=True)
class CaptionExample:
    image_path: Path
    captions: list[str]  # the first is the training target; all are references for eval
    row: int


class ConversationDataset(Dataset):
    """Items ``(PIL image, Sample)``; ``examples`` holds the samples, ``skipped`` the dropped ones.

    With ``on_bad_sample="skip"`` an image that passed the build-time check but fails to load later
    gives ``(None, sample)``, which the collators drop and count; with ``"error"`` it raises ``DataError``.
    """

    format, on_bad_sample, skipped = "caption_jsonl", "error", ()  # defaults for subclasses that skip __init__

    def __init__(self, examples: list, path: str | Path, format: str = "caption_jsonl",
                 on_bad_sample: str = "error", skipped: list[Problem] | None = None):
        self.examples = examples
        self.path = Path(path)
        self.format = format
        self.on_bad_sample = on_bad_sample
        self.skipped: list[Problem] = list(skipped or [])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Image.Image | None, Sample | CaptionExample]:
        example = self.examples[index]
        return load_sample_image(example, self.path, self.on_bad_sample), example

    @property
    def embedded_images(self) -> bool:
        """Whether images live inside the data (parquet, HF, tar), unchecked until loaded."""
        return any(getattr(e, "image_source", None) is not None for e in self.examples[:1])

    def drop(self, examples: list, problems: list[Problem]) -> None:
        """Remove ``examples`` (the very objects) and count their ``problems`` in ``skipped``."""
        gone = {id(e) for e in examples}
        self.examples = [e for e in self.examples if id(e) not in gone]
        self.skipped = [*self.skipped, *problems]


class ShardStream:
    """WebDataset tar shards read as a stream: no length, no index; ``vlm_lora.data.loader`` deals the
    shards to ranks and workers. ``samples(shards)`` yields ``Sample``s (image bytes inside) and ``Problem``s."""

    format = "webdataset"

    def __init__(self, path: str, shards: list[Path], root: Path, prompt: str, label_key: str, on_bad_sample: str):
        self.path, self.shards, self.root = path, shards, root
        self.prompt, self.label_key, self.on_bad_sample = prompt, label_key, on_bad_sample

    def samples(self, shards: list[Path]) -> Iterator[Sample | Problem]:
        for shard in shards:
            yield from iter_shard(shard, self.root, self.prompt, self.label_key)


def load_dataset(path: str | Path, format: str = "auto", image_root: str | Path | None = None,
                 prompt: str = DEFAULT_PROMPT, on_bad_sample: str = "error",
                 label_key: str = "label", split: str = "train",
                 streaming: str | bool = "auto") -> ConversationDataset | ShardStream:
    """The data at ``path`` (any format of ``vlm_lora.data.formats`` or ``vlm_lora.data.sources``).

    Image files are checked now; bad samples (malformed rows, missing or unreadable image files) are
    all listed in one ``DataError``, or with ``on_bad_sample="skip"`` dropped, kept in ``dataset.skipped``
    and logged in one line. ``split`` picks the split of an HF dataset; ``streaming`` (``auto``: tar
    shards only) returns a ``ShardStream``, whose bad samples are found as they are read.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise DataError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    source = source_format(str(path), format)
    if streaming is True and source != "webdataset":
        raise DataError(f"{path}: data.streaming: true reads WebDataset tar shards only (this is "
                        f"{source or 'a file format'}); map-style sources are memory-mapped instead")
    if source == "webdataset" and streaming in ("auto", True):
        shards = shard_paths(str(path))
        _check_shards(path, shards, on_bad_sample)
        return ShardStream(str(path), shards, Path(image_root) if image_root else shards[0].parent, prompt,
                           label_key, on_bad_sample)
    if source:
        samples, problems = read_source(str(path), source, split, image_root, prompt, label_key, on_bad_sample)
        files = [s for s in samples if s.image_source is None]  # rows naming image files: check them now
        checked, bad = check_images(files)
        gone = {id(s) for s in files} - {id(s) for s in checked}
        fmt, samples, problems = source, [s for s in samples if id(s) not in gone], problems + bad
    else:
        fmt, samples, problems = read_samples(path, format, image_root, prompt, label_key)
    if problems and on_bad_sample == "error":
        raise DataError(format_problems(path, problems))
    if problems:
        log.warning("%s", _skip_line(path, problems))
    if not samples:
        raise DataError(f"{path}: no usable samples" + (f"\n{format_problems(path, problems)}" if problems else ""))
    text_only = sum(getattr(s, "text_only", False) for s in samples)
    if text_only:
        log.info("%s: %d of %d samples have no image and train as text only", path, text_only, len(samples))
    return ConversationDataset(samples, path, fmt, on_bad_sample, problems)


def _check_shards(path, shards: list[Path], on_bad_sample: str) -> None:
    """Open every streamed shard now: unreadable or truncated ones are named before training (an error, or
    with skip a warning: they are read up to the cut and their lost samples counted then)."""
    bad = [Problem(str(s), str(s), reason) for s in shards if (reason := check_shard(s))]
    if bad and on_bad_sample == "error":
        raise DataError(format_problems(path, bad, "bad tar shard(s)") + "\n(replace them, leave them out of the "
                        "pattern, or set data.on_bad_sample: skip to read what they hold)")
    if bad:
        log.warning("%s", format_problems(path, bad, "bad tar shard(s), read up to the damage"))


class CaptionDataset(ConversationDataset):
    """Caption JSONL rows ``{"image": path, "caption": str}`` (or ``"captions": [str, ...]``).

    Image paths are relative to ``image_root`` or, by default, to the JSONL's folder. Every row and
    image is checked when the data set is built (see ``load_dataset``).
    """

    def __init__(self, jsonl: str | Path, image_root: str | Path | None = None, prompt: str = DEFAULT_PROMPT,
                 on_bad_sample: str = "error", label_key: str = "label"):
        data = load_dataset(jsonl, "caption_jsonl", image_root, prompt, on_bad_sample, label_key)
        super().__init__(data.examples, data.path, data.format, on_bad_sample, data.skipped)


def load_image(path, where: str) -> Image.Image:
    """An RGB image from a file path or a binary file object."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        shown = path if isinstance(path, (str, Path)) else "(embedded)"
        raise DataError(f"{where}: cannot read image {shown}: {error}") from None


def load_sample_image(example, path, on_bad_sample: str = "error") -> Image.Image | list[Image.Image] | None:
    """The sample's image (its file or embedded bytes), the list of its images for a multi-image sample (a video
    sample: its images and ``VideoRef``s in placeholder order), ``[]`` for a text-only one; None, logged, if one is
    unreadable and ``on_bad_sample`` is skip."""
    where = getattr(example, "where", "")
    where = (where if where.startswith(str(path)) else f"{path} {where}") if where else f"{path}:{example.row}"
    if getattr(example, "text_only", False):
        return []
    source = getattr(example, "image_source", None)
    first = source if source is not None else example.image_path
    sources = [*([first] if first is not None else []), *getattr(example, "extra_images", ())]
    try:
        images = [load_image(s if isinstance(s, (str, Path)) else _open(s, where), where) for s in sources]
        if getattr(example, "videos", None):  # read when collated (the processor holds the sampling options)
            return order_media(example, images, example.videos)
        return images if len(images) > 1 else images[0]
    except DataError as error:
        if on_bad_sample != "skip":
            raise
        log.warning("skipping %s", error)
        return None


def _open(source, where: str):
    """An embedded image source opened (a file object or path); a failure names the sample."""
    try:
        return source.open()
    except (DataError, OSError) as error:
        raise DataError(f"{where}: cannot read image: {error}") from None


def _skip_line(path, problems: list[Problem], what: str = "bad sample(s)", shown: int = 50) -> str:
    """One log line: how many were skipped and their ids (with the reason's first words)."""
    ids = ", ".join(f"{p.where} ({p.reason.split(':')[0]})" for p in problems[:shown])
    more = f" and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{path}: skipped {len(problems)} {what}: {ids}{more}"
