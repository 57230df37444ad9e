"""The collator masks everything but the answer; bad data fails with the file and row named."""

import json

import pytest
import torch
from PIL import Image

from conftest import ASSET_DATA, ASSET_MODEL
from vlm_lora.data import IGNORE_INDEX, CaptionCollator, CaptionDataset, DataError


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ASSET_MODEL)


def test_only_answer_tokens_are_labelled(processor):
    data = CaptionDataset(ASSET_DATA / "microscopy" / "train.jsonl")
    batch = CaptionCollator(processor, "Describe the image.")([data[0], data[1], data[2]])
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for row in range(3):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX]
        assert tok.decode(kept) == " " + data.examples[row].captions[0] + tok.eos_token
        ids = batch["input_ids"][row]
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        n_image = int((ids == image_id).sum())
        assert n_image == (48 // 8) ** 2  # every image token survives, none truncated
        # labels sit exactly on their input tokens (the model shifts internally)
        mask = labels != IGNORE_INDEX
        assert torch.equal(ids[mask], labels[mask])
    assert batch["pixel_values"].shape == (3, 3, 48, 48)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_prompt_is_what_generation_sees(processor):
    from vlm_lora.data import build_prompt

    prompt = build_prompt(processor, "Describe the image.")
    assert prompt == "USER: <image>\nDescribe the image. ASSISTANT:"


def test_missing_and_bad_rows_are_all_reported(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rows = [{"image": "ok.png", "caption": "fine"}, {"image": "gone.png", "caption": "x"}, {"image": "ok.png"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.raises(DataError) as info:
        CaptionDataset(tmp_path / "d.jsonl")
    message = str(info.value)
    assert "3 bad row(s)" in message
    assert "line 2: image not found" in message and "gone.png" in message
    assert "line 3: needs 'image'" in message and "line 4: not JSON" in message


def test_corrupt_image_names_file_and_row(tmp_path):
    """Unreadable images are found when the data set is built; one that breaks later fails when loaded."""
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "broken.png", "caption": "c"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: 1 bad row\(s\):\n  - line 1: cannot read image .*broken.png"):
        CaptionDataset(tmp_path / "d.jsonl")
    Image.new("RGB", (8, 8)).save(tmp_path / "broken.png")
    data = CaptionDataset(tmp_path / "d.jsonl")
    (tmp_path / "broken.png").write_bytes(b"broken after the check")
    with pytest.raises(DataError, match=r"d.jsonl line 1: cannot read image .*broken.png"):
        data[0]
