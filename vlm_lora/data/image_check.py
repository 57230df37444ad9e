"""Before training: every image file a data set names is opened and verified once (inline bytes too).

Images inside parquet, HF datasets or shards are checked when a sample is loaded instead, so a big
embedded set does not have to be decoded up front.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlm_lora.data.formats import Problem, Sample
from vlm_lora.data.messages import EmbeddedBytes
from vlm_lora.data.video import check_video


def check_images(rows: list[Sample | Problem]) -> tuple[list[Sample], list[Problem]]:
    """Split rows into samples whose image opens and verifies, and problems (file order kept)."""
    samples, problems, seen = [], [], {}
    for item in rows:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        if item.text_only:
            samples.append(item)
            continue
        first = item.image_path if item.image_source is None else item.image_source
        files = [p for p in [first, *item.extra_images]  # images in parquet, HF or shards are checked when loaded
                 if isinstance(p, (Path, EmbeddedBytes))]
        for path in files:
            if path not in seen:
                seen[path] = verify_image(path)
        size = seen[first][0] if first in seen else None
        reason = next((seen[p][1] for p in files if seen[p][1]), None) or next(
            (why for why in map(check_video, item.videos) if why), None)
        if reason:
            problems.append(Problem(item.id, item.where, reason))
        else:
            item.image_size = size
            samples.append(item)
    return samples, problems


def verify_image(path: Path | EmbeddedBytes) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for an image PIL can read (a file or inline bytes), else (None, why)."""
    if isinstance(path, Path) and not path.is_file():
        return None, f"image not found: {path}"
    try:
        with Image.open(path if isinstance(path, Path) else path.open()) as image:
            size = image.size
            image.verify()
        return size, None
    except Exception as error:  # PIL raises many kinds on bad files
        return None, f"cannot read image {path if isinstance(path, Path) else '(inline)'}: {error}"
