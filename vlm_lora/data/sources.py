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
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlm_lora.data.formats import DataError, Problem, Sample, record_sample
from vlm_lora.data.messages import EmbeddedBytes

log = logging.getLogger("vlm_lora")
SOURCE_FORMATS = ("parquet", "hf_dataset", "webdataset")
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
IMAGE_DTYPES = ("binary", "large_binary", "string", "large_string", "null")
TRUNCATED = ("unexpected end", "truncated")  # tarfile's ReadError messages for a file cut short
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
        raise DataError(f"row {self.row} of the image column holds no image bytes or path")


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
    _refuse_compressed([path])
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
        if not any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):  # not an imagefolder
            _refuse_compressed([str(p) for p in folder.glob("*.t*")])
    return None


def _refuse_compressed(names: list[str]) -> None:
    """Compressed shards cannot be read by seeking (the map-style index), so they are refused by name."""
    compressed = [n for n in names if n.lower().endswith(COMPRESSED_TARS)]
    if compressed:
        raise DataError(f"{compressed[0]}: compressed tar shards are not read; WebDataset shards must be "
                        "uncompressed .tar files (decompress each with `gunzip -k`, `xz -dk`, ...)")


def split_names(path: str, format: str = "auto") -> list[str] | None:
    """The splits of an HF dataset (a saved ``DatasetDict`` folder or ``hf:`` hub id); None for data without
    splits (files, parquet, shards, a saved single ``Dataset``)."""
    if source_format(path, format) != "hf_dataset":
        return None
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "dataset_dict.json").is_file():
            return None
        return json.loads((folder / "dataset_dict.json").read_text()).get("splits")
    import datasets

    try:
        return datasets.get_dataset_split_names(path.removeprefix(HUB_PREFIX))
    except Exception as error:  # noqa: BLE001 - unreachable hub, unknown id: the loader reports it
        raise DataError(f"{path}: cannot list its splits: {error}") from None


def shard_paths(pattern: str) -> list[Path]:
    """The tar shards of a brace pattern, a single ``.tar`` or a folder of them; all must exist."""
    folder = Path(pattern)
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else [Path(p) for p in expand_braces(pattern)]
    _refuse_compressed([str(s) for s in shards])
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise DataError(f"{pattern}: {len(missing)} of {len(shards)} tar shard(s) not found "
                        f"(first: {missing[0] if missing else pattern})")
    return shards


def check_shard(shard: Path) -> str | None:
    """Why a tar shard cannot be streamed (None: it opens, and ends with the end-of-archive block)."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            magic = f.read(2)
            f.seek(max(0, size - 512))
            tail = f.read(512)
        if magic == b"\x1f\x8b":
            return "gzip-compressed; WebDataset shards must be uncompressed .tar"
        with tarfile.open(shard, "r:") as tar:
            tar.next()
    except (tarfile.TarError, OSError) as error:
        return f"not a readable tar file ({error})"
    if size % 512 or len(tail) < 512 or any(tail):
        return f"truncated ({size} bytes, no end-of-archive block): the samples after the cut are lost"
    return None


def _parquet_files(path: str, on_bad_sample: str = "error") -> list[str]:
    """The parquet files of a file, glob or folder; unreadable ones are named (empty ones skipped in skip mode)."""
    import pyarrow.parquet as pq

    folder = Path(path)
    files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no parquet file matches")
    bad, columns = {}, {}
    for file in files:
        try:
            columns[file] = pq.read_schema(file).names
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError ... on a file that is not parquet
            bad[file] = "empty file (0 bytes)" if Path(file).stat().st_size == 0 else f"not a parquet file ({error})"
    empty = [f for f, reason in bad.items() if reason.startswith("empty")]
    if bad and (on_bad_sample == "error" or len(empty) < len(bad)):
        hint = " or set data.on_bad_sample: skip to skip empty files" if len(empty) == len(bad) else ""
        raise DataError(f"{path}: {len(bad)} unreadable parquet file(s) (remove them from the folder or glob{hint}):"
                        + "".join(f"\n  - {f}: {reason}" for f, reason in bad.items()))
    if empty:
        log.warning("%s: skipped %d empty parquet file(s): %s", path, len(empty), ", ".join(empty))
    files = [f for f in files if f not in bad]
    if not files:
        raise DataError(f"{path}: every parquet file is empty")
    other = [f for f in files if sorted(columns[f]) != sorted(columns[files[0]])]
    if other:
        has = [f"{f} has {', '.join(columns[f])}" for f in [files[0], *other]]
        raise DataError(f"{path}: the parquet files have different columns: " + "; ".join(has))
    return files


# ---------------------------------------------------------------- map-style

def read_source(path: str, fmt: str, split: str, image_root: str | Path | None, prompt: str,
                label_key: str, on_bad_sample: str = "error") -> tuple[list[Sample], list[Problem]]:
    """(samples, problems) of a parquet/HF/tar source; embedded images are read when a sample is loaded."""
    if fmt == "webdataset":
        shards = shard_paths(path)
        root = Path(image_root) if image_root else shards[0].parent
        samples, problems = [], []
        for shard in shards:
            for item in iter_shard(shard, root, prompt, label_key, read_images=False):
                (problems if isinstance(item, Problem) else samples).append(item)
        return samples, problems
    table, root = _arrow_table(path, fmt, split, on_bad_sample)
    return _arrow_samples(table, path, Path(image_root) if image_root else root, prompt, label_key)


def _arrow_table(path: str, fmt: str, split: str, on_bad_sample: str = "error"):
    """(memory-mapped datasets.Dataset, folder that relative image paths resolve from)."""
    import datasets

    files = _parquet_files(path, on_bad_sample) if fmt == "parquet" else []
    try:
        if files:
            return datasets.Dataset.from_parquet(files), Path(files[0]).parent
        local = Path(path)
        if local.is_dir():
            loaded, root = datasets.load_from_disk(str(local)), local
        else:
            loaded, root = datasets.load_dataset(path.removeprefix(HUB_PREFIX), split=split), Path.cwd()
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        raise DataError(f"{path}: cannot open as {fmt}: {error.__cause__ or error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (data.split); splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded, root


def _arrow_samples(table, name: str, root: Path, prompt: str, label_key: str) -> tuple[list[Sample], list[Problem]]:
    import datasets
    import pyarrow.compute as pc

    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None and "messages" in table.column_names:  # the images are inside the messages
        return _rows(table, None, name, root, prompt, label_key)
    if column is None:
        raise DataError(f"{name}: no image column (one of {', '.join(IMAGE_COLUMNS)}); columns: "
                        f"{', '.join(table.column_names)}")
    feature = table.features[column]
    inner = getattr(feature, "feature", feature)  # List(x) -> x
    if not (isinstance(inner, datasets.Image) or isinstance(inner, datasets.Value) and inner.dtype in IMAGE_DTYPES
            or isinstance(inner, dict) and ("bytes" in inner or "path" in inner)):
        shown = inner.dtype if isinstance(inner, datasets.Value) else type(inner).__name__
        raise DataError(f"{name}: column {column!r} holds {shown} values, not images; an image column holds image "
                        "bytes, {bytes, path} structs (an HF Image feature) or paths (or a list of them per row)")
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
        counts = [n if p else 0 for n, p in zip(pc.list_value_length(values).to_pylist(), present)] \
            if inner is not feature else [int(p) for p in present]
        images = (images, counts)
    return _rows(texts, images, name, root, prompt, label_key)


def _rows(texts, images: tuple | None, name: str, root: Path, prompt: str, label_key: str):
    """(samples, problems) of the rows of ``texts``; ``images``: (the image column, images per row), or None
    when the rows name their images (paths, images inside the messages)."""
    samples, problems = [], []
    for row, record in enumerate(texts):
        where = f"{name} row {row}"
        image = None
        if images is not None and images[1][row]:  # else a text-only row, or a chat row with its images inside
            image = [ArrowImage(images[0], row, root, i) for i in range(images[1][row])]
        item = record_sample(record, row, where, root, prompt, label_key, image=image)
        (problems if isinstance(item, Problem) else samples).append(item)
    return samples, problems


# ---------------------------------------------------------------- tar shards

def iter_shard(shard: Path, root: Path, prompt: str, label_key: str,
               read_images: bool = True) -> Iterator[Sample | Problem]:
    """The samples of one tar shard in file order: members ``key.<ext>`` grouped by key.

    ``read_images``: the image bytes come with the sample (streaming); else only its offset (an index).
    A shard cut short (no end-of-archive block, or data missing) loses the sample at the cut: a ``Problem``
    naming it (the samples before it are kept); a shard that cannot be read at all is a ``Problem`` naming it.
    """
    key, parts = None, {}
    try:
        with tarfile.open(shard, "r:") as tar:
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
            end = tar.offset
        truncated = not _ends_at(shard, end)
    except (tarfile.TarError, OSError, EOFError) as error:
        truncated = isinstance(error, tarfile.ReadError) and any(w in str(error) for w in TRUNCATED)
        if not truncated:
            yield Problem(str(shard), f"{shard}", f"unreadable tar shard after sample {key!r}: {error}")
            return
    if truncated:
        where = f"{shard} sample {key!r}" if key is not None else str(shard)
        yield Problem(key if key is not None else str(shard), where, "the tar shard is cut short (truncated) in "
                      "or after this sample: it and any samples after it in the shard are lost")
    elif key is not None:
        yield _tar_sample(shard, key, parts, root, prompt, label_key)


def _ends_at(shard: Path, offset: int) -> bool:
    """Whether the tar ``shard`` holds its end-of-archive block (a zero block) at ``offset``."""
    with open(shard, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)


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
