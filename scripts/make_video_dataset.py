"""Generate the embedded video set: short clips of one shape moving across a grey 56 x 56 field.

Each clip is a folder of PNG frames (``clips/<split>_<nnn>/frame_<k>.png``, 4 to 8 frames) showing a
red, green, blue or yellow circle, square or triangle moving left, right, up or down; its caption
says so ("a red square moves left"). Rows:

* ``{train,eval}.jsonl``: ``{"video": "clips/train_000", "video_fps": 4, "caption": "..."}``;
* ``qa_eval.jsonl``: the eval clips asked "Which way does the <shape> move?" (``answer``: the direction).

Clips are drawn from a seeded ``random.Random``, so re-running reproduces the files byte for byte::

    python scripts/make_video_dataset.py     # writes assets/data/video
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, SHAPE_SIZE, SOURCE_FPS = 56, 14, 4
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = {"train": 40, "eval": 10}


def draw_frame(shape: str, color: str, x: int, y: int) -> Image.Image:
    """A grey frame with ``shape`` of ``color`` whose top-left corner is at (x, y)."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    draw, box = ImageDraw.Draw(image), (x, y, x + SHAPE_SIZE, y + SHAPE_SIZE)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + SHAPE_SIZE // 2, y), (x, y + SHAPE_SIZE), (x + SHAPE_SIZE, y + SHAPE_SIZE)], fill=fill)
    return image


def clip_frames(rng: random.Random) -> tuple[list[Image.Image], str, str, str]:
    """(frames, shape, colour, direction) of one clip: the shape crosses most of the field."""
    shape, color, direction = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(DIRECTIONS))
    n = rng.randint(4, 8)
    dx, dy = DIRECTIONS[direction]
    travel = SIZE - SHAPE_SIZE - 8
    across = rng.randint(4, SIZE - SHAPE_SIZE - 4)  # the fixed coordinate
    frames = []
    for k in range(n):
        along = 4 + round(travel * k / (n - 1))
        along = along if dx + dy > 0 else SIZE - SHAPE_SIZE - along
        x, y = (along, across) if dx else (across, along)
        frames.append(draw_frame(shape, color, x, y))
    return frames, shape, color, direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "data" / "video"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    if (out / "clips").exists():
        shutil.rmtree(out / "clips")
    questions = []
    for split, count in SPLITS.items():
        rows = []
        for i in range(count):
            frames, shape, color, direction = clip_frames(rng)
            folder = out / "clips" / f"{split}_{i:03d}"
            folder.mkdir(parents=True)
            for k, frame in enumerate(frames):
                frame.save(folder / f"frame_{k}.png", optimize=True)
            video = folder.relative_to(out).as_posix()
            rows.append({"video": video, "video_fps": SOURCE_FPS, "caption": f"a {color} {shape} moves {direction}"})
            if split == "eval":
                questions.append({"video": video, "video_fps": SOURCE_FPS, "question": f"Which way does the {shape} move?",
                                  "answer": direction})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "qa_eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in questions))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {sum(SPLITS.values())} clips to {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
