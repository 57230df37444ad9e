"""Evaluation outputs of a model comparison: summary JSON, predictions JSONL, HTML report, contact sheet.

``report.html`` is self-contained (images embedded as base64 data URIs): a metrics table with
the best value per column highlighted, then one table row per image with its references and
every model's caption and per-sample CIDEr-D. ``contact_sheet.png`` is a grid of the first
images with the captions underneath.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

METRICS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
           ("rougeL", "ROUGE-L"), ("cider", "CIDEr-D"), ("vqa_accuracy", "VQA acc."), ("exact_match", "exact match"),
           ("anls", "ANLS"), ("choice_accuracy", "choice acc.")]
COLORS = ["#555555", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin-bottom: 24px; }
th, td { border: 1px solid #ccc; padding: 6px 10px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #d8f5d0; font-weight: bold; }
img { width: 144px; height: auto; display: block; }
img.small { image-rendering: pixelated; }
.path { font-size: 11px; color: #777; word-break: break-all; max-width: 144px; }
ul.refs { margin: 0; padding-left: 18px; }
td.pred .cider { display: block; font-size: 11px; color: #777; margin-top: 4px; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dl.settings dt { font-weight: bold; }
dl.settings dd { margin: 0; }
"""


def write_outputs(out_dir: str | Path, summary: dict, rows: list[dict], settings: dict,
                  contact_sheet_images: int = 16) -> dict[str, Path]:
    """Write ``summary.json``, ``predictions.jsonl``, ``report.html`` and (unless
    ``contact_sheet_images`` is 0) ``contact_sheet.png``; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("summary.json", "predictions.jsonl", "report.html")}
    paths["summary.json"].write_text(json.dumps(summary, indent=2) + "\n")
    with open(paths["predictions.jsonl"], "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    write_html_report(paths["report.html"], summary, rows, settings)
    if contact_sheet_images > 0:
        paths["contact_sheet.png"] = out_dir / "contact_sheet.png"
        write_contact_sheet(paths["contact_sheet.png"], rows[:contact_sheet_images])
    return paths


# ---------------------------------------------------------------- HTML

def _image_data_uri(path: str | Path, max_side: int = 256) -> tuple[str, bool]:
    """(data URI, is_small): a PNG of the image (a JPEG thumbnail if larger than ``max_side``)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
        image.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}", max(image.size) <= 64


def _best(values: list[float]) -> float | None:
    return max(values) if values else None


def metrics_table(summary: dict) -> str:
    labels = list(summary)
    columns = [(key, title, lambda m, key=key: m.get(key)) for key, title in METRICS
               if any(key in summary[label] for label in labels)]
    columns.append(("samples_per_s", "samples/s", lambda m: m.get("speed", {}).get("samples_per_s")))
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    best = {key: _best([v for v in (get(summary[l]) for l in labels) if v is not None]) for key, _, get in columns}
    body = []
    for label in labels:
        cells = []
        for key, _, get in columns:
            value = get(summary[label])
            text = "-" if value is None else f"{value:.2f}" if key == "samples_per_s" else f"{value:.4f}"
            cls = "num best" if value is not None and value == best[key] else "num"
            cells.append(f'<td class="{cls}" data-metric="{key}">{text}</td>')
        n = summary[label].get("n", "")
        body.append(f'<tr data-model="{html.escape(label)}"><th>{html.escape(label)}</th>{"".join(cells)}'
                    f'<td class="num">{n}</td></tr>')
    return (f'<table class="metrics"><thead><tr><th>model</th>{head}<th>n</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def samples_table(rows: list[dict], labels: list[str], score_name: str = "CIDEr-D") -> str:
    """One row per sample; QA rows (``question``, ``answers``, per-sample ``scores``) add a question column."""
    questions = any("question" in row for row in rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for i, row in enumerate(rows, start=1):
        uri, small = _image_data_uri(row["image"])
        refs = "".join(f'<li class="ref">{html.escape(r)}</li>' for r in row.get("answers", row.get("references", [])))
        if row.get("options"):
            refs += f'<li class="options">options: {html.escape(" | ".join(row["options"]))}</li>'
        question = f'<td class="question">{html.escape(row.get("question", ""))}</td>' if questions else ""
        ciders = row.get("cider", row.get("scores", {}))
        top = max(ciders.values()) if ciders else None
        preds = []
        for label in labels:
            score = ciders.get(label)
            cls = "pred best" if score is not None and score == top and len(labels) > 1 else "pred"
            note = f'<span class="cider">{score_name} {score:.3f}</span>' if score is not None else ""
            preds.append(f'<td class="{cls}" data-model="{html.escape(label)}">'
                         f'<span class="caption">{html.escape(row["predictions"][label])}</span>{note}</td>')
        name = html.escape(Path(row["image"]).name)
        body.append(f'<tr class="sample" data-image="{html.escape(row["image"])}"><td>{i}</td>'
                    f'<td><img class="{"small" if small else ""}" src="{uri}" alt="{name}">'
                    f'<div class="path">{name}</div></td>{question}<td><ul class="refs">{refs}</ul></td>'
                    f'{"".join(preds)}</tr>')
    columns = "<th>question</th><th>answers</th>" if questions else "<th>references</th>"
    return (f'<table class="samples"><thead><tr><th>#</th><th>image</th>{columns}{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def write_html_report(path: str | Path, summary: dict, rows: list[dict], settings: dict) -> None:
    """A self-contained HTML page: settings, the metrics table, then every sample."""
    labels = list(summary)
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in settings.items())
    task = settings.get("task", "caption")
    score_name = {"vqa": "VQA acc.", "choice": "correct"}.get(task, "CIDEr-D")
    title = {"vqa": "VQA evaluation", "choice": "Multiple-choice evaluation"}.get(task, "Caption evaluation")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
            f'<dl class="settings">{items}</dl>\n<h2>Metrics</h2>\n{metrics_table(summary)}\n'
            f"<h2>Samples ({len(rows)})</h2>\n{samples_table(rows, labels, score_name)}\n</body></html>\n")
    Path(path).write_text(page, encoding="utf-8")


# ---------------------------------------------------------------- contact sheet

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split() or [""]:
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def write_contact_sheet(path: str | Path, rows: list[dict], columns: int = 4, tile: int = 240,
                        font_size: int = 13) -> None:
    """A PNG grid of ``rows``' images, each with its first reference and every model's caption below."""
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = font_size + 4
    pad = 8
    tiles = []
    for row in rows:
        with Image.open(row["image"]) as image:
            image = image.convert("RGB")
        scale = min(tile / image.width, tile / image.height)
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
        texts = [("Q: " + row["question"], "#000000")] if "question" in row else []
        texts += [("reference: " + row.get("answers", row.get("references"))[0], "#000000")]
        texts += [(f"{label}: {caption}", COLORS[i % len(COLORS)])
                  for i, (label, caption) in enumerate(row["predictions"].items())]
        lines = [(line, color) for text, color in texts for line in _wrap(text, font, tile, measure)]
        tiles.append((image, lines))
    columns = max(1, min(columns, len(tiles)))
    grid_rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(im.height + pad + len(lines) * line_height for im, lines in r) for r in grid_rows]
    sheet = Image.new("RGB", (columns * (tile + 2 * pad), sum(heights) + 2 * pad * len(grid_rows) or 1), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r, height in zip(grid_rows, heights):
        for c, (image, lines) in enumerate(r):
            x = c * (tile + 2 * pad) + pad
            sheet.paste(image, (x + (tile - image.width) // 2, y + pad))
            ty = y + pad + image.height + pad
            for line, color in lines:
                draw.text((x, ty), line, fill=color, font=font)
                ty += line_height
        y += height + 2 * pad
    sheet.save(path)
