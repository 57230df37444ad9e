"""Padding-free packing: positions, masks and the packed loss/gradients against the padded batch."""

from __future__ import annotations

import inspect
import json
import math
from functools import partial

import pytest
import torch

from tests.conftest import ASSET_DATA, ASSET_MODEL, REPO, randomize_adapters
from vlm_lora.architectures.qwen2_vl import mrope_positions
from vlm_lora.data.datasets import IGNORE_INDEX, CaptionExample, DataError
from vlm_lora.data.packing import PackingCollator, pack_batch, sample_positions


def test_sample_positions_restart_per_sample():
    assert sample_positions(torch.tensor([3, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]


def test_pack_batch_fills_rows_first_fit_and_reorders_images():
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0], [1, 2, 3, 4]])
    labels = torch.where(ids == 0, IGNORE_INDEX, ids)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels,
             "pixel_values": torch.arange(3.0).view(3, 1, 1, 1)}
    packed = pack_batch(batch, row_tokens=6, pad_id=99)
    # longest first: [1 2 3 4] opens row 0, [7 8 9] opens row 1 (no room in row 0), [5 6] fits row 0
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 99, 99, 99]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 6], [IGNORE_INDEX, 8, 9] + [IGNORE_INDEX] * 3]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # the tail is its own run
    assert packed["pixel_values"].flatten().tolist() == [2.0, 0.0, 1.0]  # images follow their samples
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert pack_batch(batch)["input_ids"].shape == (3, 4)  # default rows: the longest sample, nothing fits beside it


def test_videos_and_multi_axis_rope_without_its_function_are_refused():
    ids = torch.ones(1, 3, dtype=torch.long)
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(DataError, match="data.packing: .*image_grid_thw.*set data.packing: false"):
        pack_batch({"input_ids": ids, "attention_mask": ids, "image_grid_thw": grid})
    rope = partial(mrope_positions, image_token_id=7, spatial_merge_size=2)
    with pytest.raises(DataError, match=r"data.packing: videos \(video_grid_thw\) are not packed.*data.packing: false"):
        pack_batch({"input_ids": ids, "attention_mask": ids, "video_grid_thw": grid}, rope_positions=rope)


def test_pack_batch_moves_each_samples_patches_and_grids_and_packs_rope_positions():
    """Hand-made multi-axis batch (merge 1: one token per patch): sample 0 has one 1x1 image, sample 1
    a 1x2 and a 2x2 image; the longer sample 1 goes first, with its 6 patches and 2 grid rows."""
    ids = torch.tensor([[5, 9, 6, 0, 0, 0, 0, 0, 0, 0, 0], [5, 9, 9, 6, 9, 9, 9, 9, 7, 7, 7]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.clone(),
             "image_grid_thw": torch.tensor([[1, 1, 1], [1, 1, 2], [1, 2, 2]]),
             "pixel_values": torch.arange(7.0).view(7, 1)}
    packed = pack_batch(batch, rope_positions=partial(mrope_positions, image_token_id=9, spatial_merge_size=1))
    assert packed["pixel_values"].flatten().tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert packed["image_grid_thw"].tolist() == [[1, 1, 2], [1, 2, 2], [1, 1, 1]]
    # text, 1x2 image at 1 (then +2), text at 3, 2x2 image at 4 (then +2), text from 6; tail: 0
    assert packed["position_ids"][:, 0].tolist() == [list(range(11)),
                                                    [0, 1, 1, 3, 4, 4, 4, 4, 6, 7, 8],
                                                    [0, 1, 1, 3, 4, 4, 5, 5, 6, 7, 8],
                                                    [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8]]
    assert packed["position_ids"][:, 1].tolist() == [[0, 1, 2] + list(range(8))] + [[0, 1, 2] + [0] * 8] * 3


def test_several_image_rows_per_sample_are_refused():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(DataError, match="3 image rows for 2 samples"):
        pack_batch({"input_ids": ids, "attention_mask": ids, "pixel_values": torch.zeros(3, 3, 4, 4)})


def _padded_and_packed(n: int = 3, row_tokens: int | None = None):
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_lora.data.collate import ChatCollator

    processor = AutoProcessor.from_pretrained(ASSET_MODEL)
    collate = ChatCollator(processor)
    captions = ["red", "a blue circle near the left edge of the image", "two small green squares on top"][:n]
    items = [(Image.new("RGB", (48, 48), (40 * i, 90, 200 - 40 * i)), CaptionExample(f"{i}.png", [c], row=i))
             for i, c in enumerate(captions)]
    return collate(items), PackingCollator(collate, row_tokens)(items)


@pytest.mark.parametrize("row_tokens", [None, 200, 10_000])
def test_packed_loss_and_gradients_equal_the_padded_batch(row_tokens):
    """tiny-llava (SDPA, block-diagonal mask from position_ids) with LoRA: same loss and LoRA gradients
    with one sample per row, two rows (one padded tail, images reordered) and one row."""
    import vlm_lora
    from transformers import LlavaForConditionalGeneration

    padded, packed = _padded_and_packed(row_tokens=row_tokens)
    lengths = padded["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == [70, 87, 94]
    assert packed["input_ids"].shape == {None: (3, 94), 200: (2, 181), 10_000: (1, 251)}[row_tokens]
    model = LlavaForConditionalGeneration.from_pretrained(ASSET_MODEL, attn_implementation="sdpa")
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    loss_padded = _assert_same_loss_and_gradients(model.train(), padded, packed)
    if row_tokens:  # the packed rows really differ from attending across samples: without the restart the loss moves
        crossed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
        with torch.no_grad():
            assert abs(model(**crossed).loss.item() - loss_padded.item()) > 1e-4


def _assert_same_loss_and_gradients(model, padded: dict, packed: dict) -> torch.Tensor:
    """The packed batch's loss and trainable gradients equal the padded batch's; returns the padded loss."""
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    assert any(".lora_A." in n for n in grads_padded) and grads_padded.keys() == grads_packed.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4)
    return loss_padded


# ---------------------------------------------------------------- Qwen-VL: multi-axis rope positions

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """family -> its tiny model folder, written once per module."""
    from vlm_lora.architectures.tiny_processors import save_tiny_family

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = save_tiny_family(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]
    return get


def _qwen_items(tmp_path):
    """3 one-image samples of different caption lengths and image shapes (grids 8x8, 6x8, 10x6 patches)
    and one sample with two images."""
    from PIL import Image

    from vlm_lora.data.datasets import load_dataset

    captions = ["red", "a blue circle near the left edge of the image", "two small green squares on top"]
    sizes = [(48, 48), (64, 48), (48, 80)]
    items = [(Image.new("RGB", size, (40 * i, 90, 200 - 40 * i)), CaptionExample(f"{i}.png", [c], row=i))
             for i, (c, size) in enumerate(zip(captions, sizes))]
    for colour in ("red", "blue"):
        Image.new("RGB", (48, 48), colour).save(tmp_path / f"{colour}.png")
    chat = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "Same colour?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "No."}]}],
            "images": ["red.png", "blue.png"]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    return items + [load_dataset(tmp_path / "chat.jsonl")[0]]


def _qwen(model_dir):
    """The tiny Qwen-VL model (SDPA) with its family's rope-position function and a chat collator."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.train.speed import packing_rope_positions

    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa")
    return model, packing_rope_positions(model), ChatCollator(AutoProcessor.from_pretrained(model_dir))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_positions_equal_the_models_get_rope_index(family, qwen_dir, tmp_path):
    model, rope, collate = _qwen(qwen_dir(family))
    padded = collate(_qwen_items(tmp_path))
    ours, images_per_sample = rope(padded)
    arguments = {"input_ids": padded["input_ids"], "image_grid_thw": padded["image_grid_thw"],
                 "attention_mask": padded["attention_mask"]}
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:  # transformers >= 5.x
        arguments["mm_token_type_ids"] = (padded["input_ids"] == model.config.image_token_id).int()
    theirs, _ = model.model.get_rope_index(**arguments)
    real = padded["attention_mask"].bool()
    assert torch.equal(ours[:, real], theirs[:, real])
    assert images_per_sample.tolist() == [1, 1, 1, 2]
    assert not torch.equal(ours[1], ours[2])  # height and width differ inside the images


@pytest.mark.parametrize("family,row_tokens", [("qwen2_5_vl", None), ("qwen2_5_vl", "medium"),
                                               ("qwen2_5_vl", "one row"), ("qwen2_vl", "medium"),
                                               ("qwen3_vl", "medium")])
def test_qwen_packed_loss_and_gradients_equal_the_padded_batch(family, row_tokens, qwen_dir, tmp_path):
    """Tiny Qwen-VL (SDPA) with LoRA on the decoder and the vision tower: packed rows ([4, R, N] positions,
    patches and image grids reordered with their samples, one sample with two images) give the padded
    batch's loss and LoRA gradients; attending across samples or 1-D rope changes the logits."""
    import vlm_lora

    model, rope, collate = _qwen(qwen_dir(family))
    items = _qwen_items(tmp_path)
    padded = collate(items)
    lengths = sorted(padded["attention_mask"].sum(1).tolist())
    tokens = {None: None, "medium": lengths[-1] + lengths[0], "one row": sum(lengths)}[row_tokens]
    packed = PackingCollator(collate, tokens, rope)(items)
    rows = packed["input_ids"].shape[0]
    assert rows == {None: 4, "medium": 3, "one row": 1}[row_tokens] and packed["position_ids"].shape[:2] == (4, rows)
    vlm_lora.plan(model, "both").apply(model)
    randomize_adapters(model)
    _assert_same_loss_and_gradients(model.train(), padded, packed)
    if row_tokens:  # the restarting text positions and the 3 rope axes both matter
        crossed, flat = (packed["position_ids"].clone() for _ in range(2))
        crossed[0] = torch.arange(crossed.shape[-1])
        flat[1:] = flat[0]
        with torch.no_grad():
            logits = model(**packed).logits
            for positions in (crossed, flat):
                assert (model(**{**packed, "position_ids": positions}).logits - logits).abs().max() > 1e-3


def test_finetune_packs_qwen2_5_vl_batches(qwen_dir, tmp_path):
    """2 steps of the quickstart recipe on tiny Qwen2.5-VL with data.packing: true (batches of 4 packed)."""
    import yaml

    from vlm_lora.recipe import apply_overrides, validate_recipe
    from vlm_lora.train import finetune

    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data = apply_overrides(data, [f"model.path={qwen_dir('qwen2_5_vl')}", "data.packing=true"])
    data["data"].update(train=str(ASSET_DATA / "microscopy" / "train.jsonl"), eval=None)
    data["train"].update(batch_size=4, max_steps=2, save_steps=100, eval_steps=None, log_steps=1, warmup_steps=0,
                         eval_base=False)
    data["output_dir"] = str(tmp_path / "run")
    finetune(validate_recipe(data))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
