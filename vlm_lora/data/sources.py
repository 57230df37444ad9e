"""Sources beyond one file: parquet, HF datasets (saved folder or Hub id) and WebDataset tar shards.

Every row goes through ``formats.record_sample``, so the same keys work everywhere: ``image``/``images``,
``caption``/``captions``/``text``, LLaVA ``conversations`` and chat ``messages``.

* Map-style (``read_source``): parquet files (one, a glob or a folder) and HF datasets are opened as
  memory-mapped Arrow tables (``datasets``); the text columns are read when the data set is built, the
  images stay in the table and are decoded when a sample is loaded (in a DataLoader worker). An image
  column may hold the Hub's ``{bytes, path}`` struct (an ``Image`` feature), raw bytes, or a path.
  Tar shards read map-style are indexed by member offset (headers only) and read by seeking.
* Streaming (``iter_shard``): tar shards read front to back, one sample (``key.png`` + ``key.txt`` or
  ``key.json``) at a time; ``vlm_lora.data.loader`` deals the shards to ranks and workers.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlm_lora.data.formats import DataError, Problem, Sample, record_sample

SOURCE_FORMATS = ("parquet", "hf_dataset", "webdataset")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
IMAGE_COLUMNS = ("image", "images", "file_name")
HUB_PREFIX = "hf:"


# ---------------------------------------------------------------- embedded images (picklable, read lazily)

@dataclass(frozen=True)
class ArrowImage:
    """Row ``row`` of the image column of a memory-mapped Arrow table: ``{bytes, path}``, bytes or a path."""

    table: Any  # a datasets.Dataset holding only the image column, Image features not decoded
    row: int
    root: Path  # relative paths inside the struct resolve here
    index: int = 0  # which image of a list column

    def open(self):
        value = self.table[self.row][self.table.column_names[0]]
        if isinstance(value, list):
            value = value[self.index]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        if isinstance(value, str):
            return self.root / value
        raise DataError(f"row {self.row}: no image bytes or path")


@dataclass(frozen=True)
class TarMember:
    """An image inside a tar shard, read by seeking to its data."""

    shard: Path
    offset: int
    size: int

    def open(self):
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return io.BytesIO(f.read(self.size))


@dataclass(frozen=True)
class EmbeddedBytes:
    """Image bytes already read (a streamed tar member)."""

    data: bytes

    def open(self):
        return io.BytesIO(self.data)


# ---------------------------------------------------------------- which source

def expand_braces(pattern: str) -> list[str]:
    """``train-{000..002}.tar`` -> three names; ``{a,b}`` alternatives; nested and repeated braces."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        width = len(numbers.group(1))
        options = [str(i).zfill(width) for i in range(int(numbers.group(1)), int(numbers.group(2)) + 1)]
    else:
        options = body.split(",")
    return [name for option in options
            for name in expand_braces(pattern[:match.start()] + option + pattern[match.end():])]


def source_format(path: str, format: str = "auto") -> str | None:
    """``parquet``/``hf_dataset``/``webdataset`` when this module reads ``path``, else None (a file format)."""
    if format != "auto":
        return format if format in SOURCE_FORMATS else None
    if path.startswith(HUB_PREFIX):
        return "hf_dataset"
    if ".tar" in path and ("{" in path or path.endswith(".tar")):
        return "webdataset"
    if path.endswith(".parquet"):
        return "parquet"
    folder = Path(path)
    if folder.is_dir():
        if any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf_dataset"
        if next(folder.rglob("*.parquet"), None) is not None:
            return "parquet"
        if next(folder.glob("*.tar"), None) is not None:
            return "webdataset"
    return None


def shard_paths(pattern: str) -> list[Path]:
    """The tar shards of a brace pattern, a single ``.tar`` or a folder of them; all must exist."""
    folder = Path(pattern)
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else [Path(p) for p in expand_braces(pattern)]
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise DataError(f"{pattern}: {len(missing)} of {len(shards)} tar shard(s) not found "
                        f"(first: {missing[0] if missing else pattern})")
    return shards


def _parquet_files(path: str) -> list[str]:
    folder = Path(path)
    files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no parquet file matches")
    return files


# ---------------------------------------------------------------- map-style

def read_source(path: str, fmt: str, split: str, image_root: str | Path | None, prompt: str,
                label_key: str) -> tuple[list[Sample], list[Problem]]:
    """(samples, problems) of a parquet/HF/tar source; embedded images are read when a sample is loaded."""
    if fmt == "webdataset":
        shards = shard_paths(path)
        root = Path(image_root) if image_root else shards[0].parent
        samples, problems = [], []
        for shard in shards:
            for item in iter_shard(shard, root, prompt, label_key, read_images=False):
                (problems if isinstance(item, Problem) else samples).append(item)
        return samples, problems
    table, root = _arrow_table(path, fmt, split)
    return _arrow_samples(table, path, Path(image_root) if image_root else root, prompt, label_key)


def _arrow_table(path: str, fmt: str, split: str):
    """(memory-mapped datasets.Dataset, folder that relative image paths resolve from)."""
    import datasets

    try:
        if fmt == "parquet":
            files = _parquet_files(path)
            return datasets.Dataset.from_parquet(files), Path(files[0]).parent
        local = Path(path)
        if local.is_dir():
            loaded, root = datasets.load_from_disk(str(local)), local
        else:
            loaded, root = datasets.load_dataset(path.removeprefix(HUB_PREFIX), split=split), Path.cwd()
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataError(f"{path}: cannot open as {fmt}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (data.split); splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded, root


def _arrow_samples(table, name: str, root: Path, prompt: str, label_key: str) -> tuple[list[Sample], list[Problem]]:
    import datasets
    import pyarrow.compute as pc

    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None:
        raise DataError(f"{name}: no image column (one of {', '.join(IMAGE_COLUMNS)}); columns: "
                        f"{', '.join(table.column_names)}")
    feature = table.features[column]
    inner = getattr(feature, "feature", feature)  # List(x) -> x
    is_path = isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")
    if is_path:  # plain paths: read with the text, checked like a JSONL's
        texts, images = table, None
    else:
        if isinstance(inner, datasets.Image):
            decoded = datasets.Image(decode=False)
            table = table.cast_column(column, datasets.List(decoded) if inner is not feature else decoded)
        texts, images = table.remove_columns([column]), table.select_columns([column])
        values = table.data.column(column)
        present = pc.invert(values.is_null()).to_pylist()
        counts = pc.list_value_length(values).to_pylist() if inner is not feature else [1] * len(present)
    samples, problems = [], []
    for row, record in enumerate(texts):
        where = f"{name} row {row}"
        image = None
        if images is not None and present[row] and counts[row]:  # else a text-only row
            image = [ArrowImage(images, row, root, i) for i in range(counts[row])]
        item = record_sample(record, row, where, root, prompt, label_key, image=image)
        (problems if isinstance(item, Problem) else samples).append(item)
    return samples, problems


# ---------------------------------------------------------------- tar shards

def iter_shard(shard: Path, root: Path, prompt: str, label_key: str,
               read_images: bool = True) -> Iterator[Sample | Problem]:
    """The samples of one tar shard in file order: members ``key.<ext>`` grouped by key.

    ``read_images``: the image bytes come with the sample (streaming); else only its offset (an index).
    A shard that cannot be read is one ``Problem`` naming it (the samples before it are kept).
    """
    key, parts = None, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                name = f"{folder}/{stem}" if folder else stem
                if name != key:
                    if key is not None:
                        yield _tar_sample(shard, key, parts, root, prompt, label_key)
                    key, parts = name, {}
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS and not read_images:
                    parts[ext] = TarMember(shard, member.offset_data, member.size)
                else:
                    parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        yield Problem(str(shard), f"{shard}", f"unreadable tar shard after sample {key!r}: {error}")
        return
    if key is not None:
        yield _tar_sample(shard, key, parts, root, prompt, label_key)


def _tar_sample(shard: Path, key: str, parts: dict, root: Path, prompt: str, label_key: str) -> Sample | Problem:
    where = f"{shard} sample {key!r}"
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
        return Problem(key, where, f"no image ({'/'.join(IMAGE_EXTENSIONS)}) among {sorted(parts)}")
    record: Any = {}
    if "json" in parts:
        try:
            record = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return Problem(key, where, f"{key}.json is not JSON ({error})")
    if "txt" in parts and isinstance(record, dict) and not any(k in record for k in ("caption", "captions", "text")):
        record = {**record, "caption": parts["txt"].decode("utf-8", "replace").strip()}
    if not record:
        return Problem(key, where, f"no caption ({key}.txt) or {key}.json")
    source = image if isinstance(image, TarMember) else EmbeddedBytes(image)
    return record_sample(record, key, where, root, prompt, label_key, image=source)
