"""Multi-image samples: LLaVA conversations and chat messages with two images, collated and trained."""

import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import ASSET_MODEL, REPO
from vlm_lora.data import IGNORE_INDEX, ChatCollator, DataError, load_dataset

N_IMAGE = (48 // 8) ** 2  # tiny-llava: image tokens per 48x48 image
# one image per user turn (markers), and two images in the one user turn of a chat-messages row
LLAVA = {"id": "pair", "image": ["red.png", "blue.png"],
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
                           {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "Blue."}]}
CHAT = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": "Same colour?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "No, red and blue."}]}],
        "images": ["red.png", "blue.png"]}


@pytest.fixture
def two_image_data(tmp_path):
    for colour in ("red", "blue"):
        Image.new("RGB", (48, 48), colour).save(tmp_path / f"{colour}.png")
    (tmp_path / "llava.json").write_text(json.dumps([LLAVA]))
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
    return load_dataset(tmp_path / "llava.json"), load_dataset(tmp_path / "chat.jsonl")


def test_two_image_samples_collate_on_llava(two_image_data):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ASSET_MODEL)
    llava, chat = two_image_data
    assert llava.examples[0].image_turns == [1, 1] and chat.examples[0].image_turns == [2]
    assert [image.getpixel((0, 0)) for image in llava[0][0]] == [(255, 0, 0), (0, 0, 255)]
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    batch = ChatCollator(processor)([llava[0], chat[0]])
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["pixel_values"].shape == (4, 3, 48, 48)  # two images per sample, in sample order
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])  # red, blue, red, blue
    assert [int((row == image_id).sum()) for row in ids] == [2 * N_IMAGE, 2 * N_IMAGE]
    assert tok.decode(labels[0][labels[0] != IGNORE_INDEX]) == " Red.</s> Blue.</s>"
    assert tok.decode(labels[1][labels[1] != IGNORE_INDEX]) == " No, red and blue.</s>"
    # each image sits in its turn: the second one after the first answer
    text = tok.decode(ids[0][: int(batch["attention_mask"][0].sum())])
    first, second = text.index("<image>"), text.rindex("<image>")
    assert first < text.index("What colour?") < text.index("Red.") < second < text.index("And this one?")
    # a cut at max_length keeps every image: no answer fits after the second image
    cut = ChatCollator(processor, max_length=int(batch["attention_mask"][0].sum()) - 2)([llava[0]])["labels"][0]
    assert tok.decode(cut[cut != IGNORE_INDEX]) == " Red.</s> Blue"
    short = ChatCollator(processor, max_length=2 * N_IMAGE + 12, on_bad_sample="skip")
    with pytest.raises(DataError, match="no sample fits max_length"):
        short.check_lengths(llava)
    assert "images + prompts + answer 2 need" in short.skipped[0].reason


def test_single_image_family_refuses_two_images(two_image_data):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(REPO / "assets" / "tiny-blip2")
    llava, _ = two_image_data
    with pytest.raises(DataError, match=r"item 1 \(id 'pair'\): 2 images in one sample; Blip2Processor takes one"):
        ChatCollator(processor)([llava[0]])
    skipping = ChatCollator(processor, on_bad_sample="skip")
    with pytest.raises(DataError, match="every sample of a batch was skipped"):
        skipping([llava[0]])
    assert [p.id for p in skipping.skipped] == ["pair"]
    assert ChatCollator(processor, max_length=8).check_lengths(llava) == []  # left to the collator, by name


def test_qwen2_vl_trains_on_two_image_samples(two_image_data, tmp_path):
    from vlm_lora.architectures.tiny_processors import save_tiny_family
    from vlm_lora.recipe import apply_overrides, validate_recipe
    from vlm_lora.train import finetune

    model = save_tiny_family("qwen2_vl", tmp_path / "tiny-qwen2_vl")
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data = apply_overrides(data, [f"model.path={model}", "strategy=both", "components.vision_encoder.mode=lora"])
    data["data"].update(train=str(tmp_path / "llava.json"), eval=None)
    data["train"].update(batch_size=1, max_steps=2, save_steps=100, eval_steps=None, log_steps=1, warmup_steps=0,
                         eval_base=False)
    data["output_dir"] = str(tmp_path / "run")
    finetune(validate_recipe(data))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
