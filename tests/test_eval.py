"""Caption evaluation: decoding, COCO ground truth, several adapters in one run, the report files."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from conftest import ASSET_DATA, ASSET_MODEL, randomize_adapters
from vlm_lora.cli import main
from vlm_lora.eval.coco import CocoCaptionDataset, is_coco_file, load_caption_data
from vlm_lora.data import CaptionDataset, DataError
from vlm_lora.eval.captioning import generate_captions, render_prompt
from vlm_lora.metrics import score_captions
from vlm_lora.modeling import load_model_and_processor

N = 8
PROMPT = "Describe the image."
DECODING = ["--batch-size", "4", "--max-new-tokens", "12", "--prompt", PROMPT]
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider", "n")


def _eval_rows() -> list[dict]:
    return [json.loads(line) for line in (ASSET_DATA / "microscopy" / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """N eval images copied into a folder, with the same ground truth as JSONL and COCO JSON.

    Each image gets two references (its caption and the caption of image i + N); the COCO file
    interleaves the annotations, uses non-contiguous ids and has one extra image without captions.
    """
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rows = _eval_rows()
    images, annotations, jsonl = [], [], []
    for i in range(N):
        name = f"images/{rows[i]['image'].split('/')[-1]}"
        shutil.copy(ASSET_DATA / "microscopy" / rows[i]["image"], root / name)
        refs = [rows[i]["caption"], rows[i + N]["caption"]]
        images.append({"id": 100 + 7 * i, "file_name": name})
        jsonl.append({"image": name, "captions": refs})
    for k in range(2):
        annotations += [{"id": len(annotations) + j, "image_id": 100 + 7 * j, "caption": jsonl[j]["captions"][k]}
                        for j in range(N)]
    images.append({"id": 999, "file_name": "images/no_captions.png"})
    (root / "gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters: ``a`` = language LoRA + a fully-trained connector (modules_to_save),
    ``b`` = LoRA r=4 on q, v only (connector not saved, so it must be the base connector)."""
    import vlm_lora

    out = tmp_path_factory.mktemp("adapters")
    setups = {"a": ({}, 1), "b": ({"connector": {"mode": "frozen"},
                                   "language_decoder": {"rank": 4, "targets": ["q", "v"]}}, 2)}
    for name, (overrides, seed) in setups.items():
        model, _ = load_model_and_processor(str(ASSET_MODEL))
        plan = vlm_lora.plan(model, "language_only", **overrides)
        plan.apply(model)
        randomize_adapters(model, seed)
        vlm_lora.save_adapter(model, out / name, str(ASSET_MODEL), plan.full_prefixes(), never_saved=plan.frozen_paths)
    assert json.loads((out / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["model.multi_modal_projector"]
    assert json.loads((out / "b" / "adapter_config.json").read_text())["modules_to_save"] is None
    return out


@pytest.fixture(scope="module")
def comparison(data_dir, adapters, tmp_path_factory):
    """``vlm-lora eval`` with the base model and adapters a, b in one run (a first: its connector must not leak)."""
    out = tmp_path_factory.mktemp("compare") / "report"
    code = main(["eval", "--model", str(ASSET_MODEL), "--adapter", str(adapters / "a"), "--adapter",
                 str(adapters / "b"), "--names", "a", "b", "--data", str(data_dir / "gt.jsonl"),
                 "--out", str(out), *DECODING])
    assert code == 0
    return out


# ---------------------------------------------------------------- decoding

def _reference_greedy(model, processor, image, max_new_tokens: int) -> str:
    """Greedy decoding by hand: full forward each step, argmax, stop at EOS."""
    tokenizer = processor.tokenizer
    inputs = processor(images=[image], text=[render_prompt(processor, PROMPT)], return_tensors="pt")
    ids = inputs["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=inputs["pixel_values"]).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_one_beam_is_exactly_greedy_and_beams_run(data_dir, adapters):
    from vlm_lora.adapters.peft_format import load_adapter

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    load_adapter(model, adapters / "a")
    data = load_caption_data(data_dir / "gt.jsonl", limit=3)
    one_beam = generate_captions(model, processor, data, PROMPT, batch_size=3, max_new_tokens=10, num_beams=1)
    by_hand = [_reference_greedy(model, processor, data[i][0], 10) for i in range(3)]
    assert one_beam == by_hand
    beams = generate_captions(model, processor, data, PROMPT, batch_size=2, max_new_tokens=10, num_beams=3)
    assert len(beams) == 3 and all(isinstance(c, str) for c in beams)
    assert len(set(one_beam)) > 1, "captions should depend on the image"


# ---------------------------------------------------------------- ground truth

def test_coco_ground_truth_has_every_reference_and_scores_like_jsonl(data_dir):
    coco, jsonl = load_caption_data(data_dir / "gt.json"), load_caption_data(data_dir / "gt.jsonl")
    assert isinstance(coco, CocoCaptionDataset) and type(jsonl) is CaptionDataset
    assert len(coco) == N  # the image without captions is skipped
    assert [ex.image_path for ex in coco.examples] == [ex.image_path for ex in jsonl.examples]
    assert [ex.captions for ex in coco.examples] == [ex.captions for ex in jsonl.examples]
    assert all(len(ex.captions) == 2 for ex in coco.examples)
    assert coco[0][0].size == Image.open(data_dir / "images" / "eval_0000.png").size

    predictions = [ex.captions[0] for ex in jsonl.examples[1:]] + ["brown stain"]
    scores = [score_captions(predictions, [ex.captions for ex in d.examples]) for d in (coco, jsonl)]
    assert scores[0] == scores[1] and scores[0]["cider"] > 0.1 and scores[0]["n"] == N
    single_ref = score_captions(predictions, [ex.captions[:1] for ex in jsonl.examples])
    assert single_ref["bleu4"] != scores[0]["bleu4"], "the second reference must count"


def test_data_format_is_inferred_and_bad_coco_names_the_file(data_dir, tmp_path):
    (tmp_path / "gt.txt").write_text((data_dir / "gt.json").read_text())
    (tmp_path / "rows.txt").write_text((data_dir / "gt.jsonl").read_text())
    assert is_coco_file(tmp_path / "gt.txt") and not is_coco_file(tmp_path / "rows.txt")
    assert len(load_caption_data(tmp_path / "gt.txt", image_root=data_dir)) == N
    assert len(load_caption_data(tmp_path / "rows.txt", image_root=data_dir, limit=3)) == 3

    bad = json.loads((data_dir / "gt.json").read_text())
    bad["annotations"].append({"image_id": 12345, "caption": "x"})
    bad["images"][0]["file_name"] = "images/missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="bad.json") as error:
        load_caption_data(tmp_path / "bad.json", image_root=data_dir)
    assert "12345" in str(error.value) and "missing.png" in str(error.value)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="list.json.*'images' and 'annotations'"):
        load_caption_data(tmp_path / "list.json")


# ---------------------------------------------------------------- several adapters, report files

class _ReportParser(HTMLParser):
    """Collects, per sample row, the image, the references and each model's caption."""

    def __init__(self):
        super().__init__()
        self.samples: list[dict] = []
        self.target: tuple | None = None  # (list or dict, key) the current text goes to
        self.text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "tr" and "sample" in classes:
            self.samples.append({"image": attrs["data-image"], "refs": [], "preds": {}, "img": None})
        elif tag == "img" and self.samples:
            self.samples[-1]["img"] = attrs["src"]
        elif tag == "li" and "ref" in classes:
            self.target, self.text = ("refs", None), ""
        elif tag == "td" and "pred" in classes:
            self.model = attrs["data-model"]
        elif tag == "span" and "caption" in classes:
            self.target, self.text = ("preds", self.model), ""

    def handle_data(self, data):
        if self.target:
            self.text += data

    def handle_endtag(self, tag):
        if self.target and tag in ("li", "span"):
            field, key = self.target
            if key is None:
                self.samples[-1][field].append(self.text)
            else:
                self.samples[-1][field][key] = self.text
            self.target = None


def test_report_files_list_every_sample_and_model(comparison, data_dir):
    data = load_caption_data(data_dir / "gt.jsonl")
    summary = json.loads((comparison / "summary.json").read_text())
    assert list(summary) == ["base", "a", "b"]
    for metrics in summary.values():
        assert set(METRICS) <= set(metrics) and metrics["n"] == N and metrics["speed"]["samples_per_s"] > 0

    rows = [json.loads(line) for line in (comparison / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(ex.image_path) for ex in data.examples]
    assert all(r["references"] == ex.captions for r, ex in zip(rows, data.examples))
    assert all(set(r["predictions"]) == {"base", "a", "b"} == set(r["cider"]) for r in rows)
    for label in summary:  # per-sample CIDEr-D averages to the corpus CIDEr-D
        assert sum(r["cider"][label] for r in rows) / N == pytest.approx(summary[label]["cider"])

    parser = _ReportParser()
    parser.feed((comparison / "report.html").read_text())
    assert len(parser.samples) == N
    for sample, row in zip(parser.samples, rows):
        assert sample["image"] == row["image"]
        assert sample["refs"] == row["references"]
        assert sample["preds"] == row["predictions"]
        assert sample["img"].startswith("data:image/png;base64,")
    html_text = (comparison / "report.html").read_text()
    best_cider = max(summary, key=lambda label: summary[label]["cider"])
    assert f'<tr data-model="{best_cider}">' in html_text and 'class="num best" data-metric="cider"' in html_text

    with Image.open(comparison / "contact_sheet.png") as sheet:
        assert sheet.width >= 4 * 240 and sheet.height > 2 * 240


def test_each_adapter_scores_as_if_loaded_alone(comparison, data_dir, adapters, tmp_path):
    summary = json.loads((comparison / "summary.json").read_text())
    rows = [json.loads(line) for line in (comparison / "predictions.jsonl").read_text().splitlines()]
    captions = {label: [r["predictions"][label] for r in rows] for label in summary}
    assert len({tuple(c) for c in captions.values()}) == 3, "base, a and b should caption differently"
    for label in summary:  # a fresh model per label, through the single-model --out FILE.json form
        out = tmp_path / f"{label}.json"
        extra = [] if label == "base" else ["--adapter", str(adapters / label)]
        assert main(["eval", "--model", str(ASSET_MODEL), *extra, "--data", str(data_dir / "gt.jsonl"),
                     "--out", str(out), *DECODING]) == 0
        alone = json.loads(out.read_text())
        alone_rows = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
        assert [r["prediction"] for r in alone_rows] == captions[label], label
        assert {k: summary[label][k] for k in METRICS} == alone, label


def test_score_reads_multi_model_predictions_and_says_why_no_meteor(comparison, tmp_path, capsys):
    summary = json.loads((comparison / "summary.json").read_text())
    assert main(["score", "--predictions", str(comparison / "predictions.jsonl"), "--out", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores == {label: {k: m[k] for k in METRICS} for label, m in summary.items()}
    assert capsys.readouterr().err.count("METEOR and SPICE skipped") == 1

    rows = [json.loads(line) for line in (comparison / "predictions.jsonl").read_text().splitlines()]
    single = tmp_path / "one.jsonl"
    single.write_text("".join(json.dumps({"image": r["image"], "prediction": r["predictions"]["a"],
                                          "references": r["references"]}) + "\n" for r in rows))
    assert main(["score", "--predictions", str(single), "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == {k: summary["a"][k] for k in METRICS}

    single.write_text('{"image": "x.png", "prediction": 3, "references": ["a"]}\n')
    assert main(["score", "--predictions", str(single)]) == 2
    assert "one.jsonl:1" in capsys.readouterr().err


def test_bad_labels_fail_before_loading_the_model(adapters, data_dir, tmp_path, capsys):
    args = ["eval", "--model", "does/not/exist", "--adapter", str(adapters / "a"), "--data",
            str(data_dir / "gt.jsonl"), "--out", str(tmp_path / "o")]
    assert main([*args, "--names", "a", "b"]) == 2
    assert "--names gives 2 label(s) for 1 adapter(s)" in capsys.readouterr().err
    assert main([*args, "--names", "base"]) == 2
    assert main([*args, "--adapter", str(adapters / "b"), "--out", str(tmp_path / "o.json")]) == 2
    assert "give a folder" in capsys.readouterr().err
