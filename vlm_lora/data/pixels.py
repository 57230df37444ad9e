"""Pixel budgets for dynamic-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Their image processors resize every image by ``smart_resize``: both sides become multiples of
``factor = patch_size * merge_size`` and the area lands in ``[min_pixels, max_pixels]``, the
aspect ratio kept as closely as possible. One image then costs ``(H / patch) * (W / patch) /
merge**2`` tokens. ``data.min_pixels`` / ``data.max_pixels`` are set on the processor itself (so
they travel with every save of it); ``data.max_total_pixels`` caps the sum over one sample's
images: when a sample's resized images exceed it, each image's own cap is scaled down by the
same ratio and the images are resized here, before the processor, to sizes it keeps as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["PixelBudget", "image_sizes", "processor_pixels", "set_processor_pixels", "smart_resize"]


def image_sizes(example) -> list[tuple[int, int]]:
    """(width, height) of each image of a sample (the checked size of a single image when known)."""
    from vlm_lora.data.formats import DataError

    extra = list(getattr(example, "extra_images", None) or [])
    if getattr(example, "image_size", None) and not extra:
        return [example.image_size]
    source = getattr(example, "image_source", None)
    first = source if source is not None else example.image_path
    sizes = []
    for path in [first, *extra] if first is not None else extra:
        try:
            with Image.open(path if isinstance(path, (str, Path)) else path.open()) as image:
                sizes.append(image.size)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            where = getattr(example, "where", "") or f"row {example.row}"
            raise DataError(f"{where}: cannot read image {path}: {error}") from None
    return sizes


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the Qwen-VL image processors resize an image to (see the module doc)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above the 200 these "
                         f"processors accept ({width}x{height})")
    rounded_h, rounded_w = round(height / factor) * factor, round(width / factor) * factor
    if rounded_h * rounded_w > max_pixels:  # shrink: floor keeps the area at or under the cap
        scale = math.sqrt(height * width / max_pixels)
        return (max(factor, math.floor(height / scale / factor) * factor),
                max(factor, math.floor(width / scale / factor) * factor))
    if rounded_h * rounded_w < min_pixels:  # grow: ceil keeps it at or over the floor
        scale = math.sqrt(min_pixels / (height * width))
        return math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return rounded_h, rounded_w


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def processor_pixels(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) a Qwen-VL style processor resizes images into."""
    size = _image_processor(processor).size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return int(get("shortest_edge")), int(get("longest_edge"))


def set_processor_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """Set the per-image pixel range on ``processor`` (``size`` as these processors save it); returns it."""
    image_processor = _image_processor(processor)
    low, high = processor_pixels(processor)
    low, high = min_pixels or low, max_pixels or high
    image_processor.size = {"shortest_edge": low, "longest_edge": high}
    for name, value in (("min_pixels", low), ("max_pixels", high)):  # older processors keep these too
        if getattr(image_processor, name, None) is not None:
            setattr(image_processor, name, value)
    return low, high


@dataclass(frozen=True)
class PixelBudget:
    """The resize rule of one processor with a per-sample cap; sizes are (width, height) as PIL's."""

    factor: int
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    max_total_pixels: int | None = None

    @classmethod
    def of(cls, processor, max_total_pixels: int | None = None) -> "PixelBudget":
        image_processor = _image_processor(processor)
        patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
        return cls(patch * merge, patch, merge, *processor_pixels(processor), max_total_pixels)

    def fit_sizes(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(width, height) each image of one sample is resized to, the sample's total within the budget."""
        fitted = [self._fit(w, h, self.max_pixels) for w, h in sizes]
        total = sum(w * h for w, h in fitted)
        if self.max_total_pixels is None or total <= self.max_total_pixels:
            return fitted
        if len(sizes) * max(self.min_pixels, self.factor ** 2) > self.max_total_pixels:
            raise ValueError(f"data.max_total_pixels {self.max_total_pixels} is below {len(sizes)} image(s) of at "
                             f"least data.min_pixels {self.min_pixels} each")
        ratio = self.max_total_pixels / total
        return [self._fit(w, h, max(self.min_pixels, int(fw * fh * ratio))) for (w, h), (fw, fh) in zip(sizes, fitted)]

    def _fit(self, width: int, height: int, max_pixels: int) -> tuple[int, int]:
        h, w = smart_resize(height, width, self.factor, self.min_pixels, max_pixels)
        return w, h

    def fit_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """One sample's images, resized (bicubic, as the processors) only where the total cap changes them;
        anything else among them (video clips) is passed through."""
        if self.max_total_pixels is None:
            return images
        stills = [image for image in images if isinstance(image, Image.Image)]
        targets = dict(zip(map(id, stills), self.fit_sizes([image.size for image in stills])))
        return [image if id(image) not in targets or self._fit(*image.size, self.max_pixels) == targets[id(image)]
                else image.resize(targets[id(image)], Image.Resampling.BICUBIC) for image in images]

    def tokens(self, sizes: list[tuple[int, int]]) -> int:
        """Image tokens one sample with images of ``sizes`` costs in the language model."""
        return sum(w * h // (self.patch_size ** 2 * self.merge_size ** 2) for w, h in self.fit_sizes(sizes))
