"""Padding-free packing: positions, masks and the packed loss/gradients against the padded batch."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ASSET_MODEL
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


def test_multi_axis_rope_batches_are_refused():
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(DataError, match="data.packing: .*image_grid_thw.*set data.packing: false"):
        pack_batch({"input_ids": ids, "attention_mask": ids, "image_grid_thw": torch.tensor([[1, 2, 2]])})


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

    from tests.conftest import randomize_adapters

    padded, packed = _padded_and_packed(row_tokens=row_tokens)
    lengths = padded["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == [70, 87, 94]
    assert packed["input_ids"].shape == {None: (3, 94), 200: (2, 181), 10_000: (1, 251)}[row_tokens]
    model = LlavaForConditionalGeneration.from_pretrained(ASSET_MODEL, attn_implementation="sdpa")
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    model.train()
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
    if row_tokens:  # the packed rows really differ from attending across samples: without the restart the loss moves
        crossed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
        with torch.no_grad():
            assert abs(model(**crossed).loss.item() - loss_padded.item()) > 1e-4
