"""Generate the two embedded image-caption data sets under ``assets/data/``.

* ``general``: procedural scenes (shapes, colours, counts, positions) in plain English.
* ``microscopy``: the shifted domain, synthetic stained-tissue fields with cells and
  lesions, captioned in a terse report style (the spirit of the ``llava_medical`` recipe).

Rows are ``{"image", "caption", "label"}``; ``label`` (the first shape, or the stain) serves
classification recipes.

Everything is drawn from a seeded ``random.Random`` and written as PNG with fixed
settings, so re-running the script reproduces the files byte for byte::

    python scripts/make_datasets.py            # writes assets/data/{general,microscopy}
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
SPLITS = {"train": 480, "eval": 100}

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# Position name -> centre of a 3x3 grid cell, in pixels.
GRID = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0),
        "left": (0, 1), "center": (1, 1), "right": (2, 1),
        "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}


def _cell_box(col: int, row: int, jitter: random.Random, radius: int) -> tuple[int, int, int, int]:
    step = IMAGE_SIZE / 3
    cx = int(step * (col + 0.5) + jitter.uniform(-2, 2))
    cy = int(step * (row + 0.5) + jitter.uniform(-2, 2))
    return cx - radius, cy - radius, cx + radius, cy + radius


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def general_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """A dark background with one or two groups of identical shapes placed in grid cells."""
    shade = rng.randint(10, 60)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cells = list(GRID.items())
    rng.shuffle(cells)
    n_groups = rng.choice((1, 1, 2))
    colors = rng.sample(sorted(COLORS), n_groups)
    shapes = [rng.choice(SHAPES) for _ in range(n_groups)]
    phrases = []
    for color, shape in zip(colors, shapes):
        count = rng.randint(1, 3)
        placed = [cells.pop() for _ in range(count)]
        for _, (col, row) in placed:
            _draw_shape(draw, shape, _cell_box(col, row, rng, 5), COLORS[color])
        noun = shape if count == 1 else shape + "s"
        where = placed[0][0] if count == 1 else "scattered"
        where_text = f"at the {where}" if count == 1 else "scattered around"
        article = "a" if count == 1 else NUMBER_WORDS[count]
        phrases.append(f"{article} {color} {noun} {where_text}")
    return image, " and ".join(phrases) + ".", shapes[0]


STAINS = {  # stain name -> (cytoplasm colour, nucleus colour)
    "purple": ((170, 110, 190), (70, 30, 110)),
    "pink": ((235, 140, 170), (150, 40, 90)),
    "brown": ((180, 120, 70), (90, 50, 20)),
}
QUADRANTS = {"upper left": (0, 0), "upper right": (1, 0), "lower left": (0, 1), "lower right": (1, 1)}


def microscopy_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """A stained tissue field: N cells with nuclei, optionally a dark irregular lesion."""
    base = (248 - rng.randint(0, 12), 228 - rng.randint(0, 12), 236 - rng.randint(0, 12))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), base)
    draw = ImageDraw.Draw(image)
    for _ in range(40):  # background speckle, the texture of a slide
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        draw.point((x, y), fill=(base[0] - 25, base[1] - 30, base[2] - 20))
    stain = rng.choice(sorted(STAINS))
    cytoplasm, nucleus = STAINS[stain]
    lesion = rng.choice([None, *sorted(QUADRANTS)])
    if lesion is not None:
        qx, qy = QUADRANTS[lesion]
        cx, cy = 12 + 24 * qx + rng.randint(-3, 3), 12 + 24 * qy + rng.randint(-3, 3)
        points = []
        for k in range(8):
            radius = rng.randint(5, 9)
            angle = k * 3.14159 / 4
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=(60, 20, 40))
    count = rng.randint(1, 5)
    taken: list[tuple[int, int]] = []
    while len(taken) < count:
        x, y = rng.randint(6, IMAGE_SIZE - 7), rng.randint(6, IMAGE_SIZE - 7)
        if all(abs(x - a) > 9 or abs(y - b) > 9 for a, b in taken):
            taken.append((x, y))
    for x, y in taken:
        rx, ry = rng.randint(4, 5), rng.randint(3, 5)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=cytoplasm)
        draw.ellipse((x - 1, y - 1, x + 2, y + 2), fill=nucleus)
    cells = "1 cell" if count == 1 else f"{count} cells"
    finding = f"lesion {lesion}" if lesion else "no lesion"
    return image, f"{stain} stain, {cells}, {finding}.", stain


def write_split(root: Path, split: str, n: int, make, rng: random.Random) -> None:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, caption, label = make(rng)
        name = f"images/{split}_{i:04d}.png"
        image.save(root / name, format="PNG", optimize=False, compress_level=9)
        rows.append({"image": name, "caption": caption, "label": label})
    with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "data")
    args = parser.parse_args()
    for name, make, seed in (("general", general_sample, 1), ("microscopy", microscopy_sample, 2)):
        rng = random.Random(seed)
        for split, n in SPLITS.items():
            write_split(args.out / name, split, n, make, rng)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
