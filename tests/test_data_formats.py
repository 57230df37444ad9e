"""Data formats, chat-template labels, max_length and bad samples, with real processors."""

import csv
import json
import logging

import pytest
import torch
from PIL import Image

from conftest import ASSET_MODEL
from vlm_lora.data import (IGNORE_INDEX, CaptionCollator, CaptionDataset, ChatCollator, DataError, build_prompt,
                           load_dataset)
from vlm_lora.data.formats import infer_format

N_IMAGE = (48 // 8) ** 2  # tiny-llava: image tokens per 48x48 image
OVERRIDE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} A:"
            "{% else %} {{ m['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ASSET_MODEL)


def png(path, color="red", size=(48, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def llava_file(tmp_path, records, name="llava.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def conv(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


TWO_TURNS = {"id": "cat-7", "image": "img/a.png",
             "conversations": conv("<image>\nWhat colour is it?", "It is red.", "Any shapes?", "One big square.")}


def spans(labels):
    """The contiguous runs of labelled positions as (start, end)."""
    mask = (labels != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, on in enumerate(mask):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ---------------------------------------------------------------- formats

def test_caption_jsonl_rows_ids_references_and_labels(tmp_path):
    png(tmp_path / "img" / "a.png"), png(tmp_path / "img" / "b.png", "blue")
    rows = [{"image": "img/a.png", "caption": "red", "label": 1}, {},
            {"image": "img/b.png", "captions": ["blue", "navy"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r) + "\n\n")
    data = load_dataset(tmp_path / "d.jsonl", prompt="Colour?")
    assert data.format == "caption_jsonl" and len(data) == 2
    a, b = data.examples
    assert (a.id, a.turns, a.references, a.label) == (1, [("Colour?", "red")], ["red"], 1)
    assert (b.id, b.turns, b.references, b.label) == (2, [("Colour?", "blue")], ["blue", "navy"], None)
    assert b.image_path == tmp_path / "img" / "b.png" and b.captions == ["blue", "navy"]
    image, example = data[1]
    assert image.getpixel((0, 0)) == (0, 0, 255) and example is b


def test_caption_csv_paths_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "deep" / "set"
    png(folder / "pics" / "a.png"), png(folder / "pics" / "b.png")
    with (folder / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["image", "caption", "kind"], ["pics/a.png", "first, with a comma", "x"],
                          ["pics/b.png", "second", "y"]])
    monkeypatch.chdir(tmp_path)
    data = load_dataset("deep/set/train.csv", label_key="kind")
    assert data.format == "caption_csv"
    assert [e.id for e in data.examples] == [2, 3]  # line numbers; the header is line 1
    assert [e.references for e in data.examples] == [["first, with a comma"], ["second"]]
    assert [e.label for e in data.examples] == ["x", "y"]
    assert [e.image_path.resolve() for e in data.examples] == [folder / "pics" / "a.png", folder / "pics" / "b.png"]


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_with_metadata(tmp_path, metadata):
    folder = tmp_path / "photos"
    png(folder / "one.png"), png(folder / "sub" / "two.png")
    rows = [{"file_name": "one.png", "text": "first"}, {"file_name": "sub/two.png", "caption": "second"}]
    if metadata.endswith("jsonl"):
        (folder / metadata).write_text("\n".join(json.dumps(r) for r in rows))
    else:
        (folder / metadata).write_text("file_name,text\none.png,first\nsub/two.png,second\n")
    data = load_dataset(folder)
    assert data.format == "imagefolder" and infer_format(folder) == "imagefolder"
    assert [e.references for e in data.examples] == [["first"], ["second"]]
    assert [e.image_path for e in data.examples] == [folder / "one.png", folder / "sub" / "two.png"]
    assert data.examples[0].turns == [("Describe the image.", "first")]


def test_llava_json_multi_turn_and_image_root(tmp_path):
    png(tmp_path / "images" / "img" / "a.png")
    other = {"id": 12, "image": "img/a.png", "label": "cat",
             "conversations": [{"from": "system", "value": "Be brief."}, *conv("Where?\n<image>", "Left.")]}
    path = llava_file(tmp_path, [TWO_TURNS, other])
    data = load_dataset(path, image_root=tmp_path / "images")
    assert data.format == "llava_json"
    a, b = data.examples
    assert a.id == "cat-7" and a.turns == [("What colour is it?", "It is red."), ("Any shapes?", "One big square.")]
    assert a.references == ["One big square."] and a.image_path == tmp_path / "images" / "img" / "a.png"
    assert (b.id, b.system, b.turns, b.label) == (12, "Be brief.", [("Where?", "Left.")], "cat")
    jsonl = tmp_path / "llava.jsonl"  # LLaVA records one per line are found by their 'conversations'
    jsonl.write_text(json.dumps(TWO_TURNS) + "\n")
    assert infer_format(jsonl) == "llava_json"
    assert load_dataset(jsonl, image_root=tmp_path / "images").examples[0].turns == a.turns


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown data format 'yaml'"):
        load_dataset(tmp_path, format="yaml")
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- labels with the chat template

def test_multi_turn_labels_are_exactly_the_answers(processor, tmp_path):
    png(tmp_path / "img" / "a.png")
    short = {"id": "s", "image": "img/a.png", "conversations": conv("<image>\nHi?", "Yo.")}
    data = load_dataset(llava_file(tmp_path, [TWO_TURNS, short]))
    batch = ChatCollator(processor)([data[0], data[1]])
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and batch["pixel_values"].shape == (2, 3, 48, 48)
    runs = spans(labels[0])
    assert [tok.decode(labels[0, s:e]) for s, e in runs] == [" It is red.</s>", " One big square.</s>"]
    assert tok.decode(labels[1][labels[1] != IGNORE_INDEX]) == " Yo.</s>"
    for row in range(2):
        on = labels[row] != IGNORE_INDEX
        assert torch.equal(ids[row][on], labels[row][on])
        assert int((ids[row] == image_id).sum()) == N_IMAGE and (labels[row][ids[row] == image_id] == IGNORE_INDEX).all()
    # the whole sequence is the rendered conversation; the second row is right-padded
    text = tok.decode(ids[0][ids[0] != image_id])
    assert text == "USER: \nWhat colour is it? ASSISTANT: It is red.</s>USER: Any shapes? ASSISTANT: One big square.</s>"
    n = int(mask[1].sum())
    assert mask[1, :n].all() and not mask[1, n:].any() and (ids[1, n:] == tok.pad_token_id).all()
    assert (labels[1, n:] == IGNORE_INDEX).all()
    # the first turn's prompt tokens are exactly what generation sees
    prompt = processor(images=[data[0][0]], text=[build_prompt(processor, "What colour is it?")], return_tensors="pt")
    assert torch.equal(ids[0, :runs[0][0]], prompt["input_ids"][0])


def test_chat_template_override_is_used(processor, tmp_path):
    png(tmp_path / "img" / "a.png")
    data = load_dataset(llava_file(tmp_path, [TWO_TURNS]))
    batch = ChatCollator(processor, chat_template=OVERRIDE)([data[0]])
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tok.decode(ids[ids != image_id]) == "Q: What colour is it? A: It is red.</s>Q: Any shapes? A: One big square.</s>"
    assert [tok.decode(labels[s:e]) for s, e in spans(labels)] == [" It is red.</s>", " One big square.</s>"]
    assert int((ids == image_id).sum()) == N_IMAGE
    assert build_prompt(processor, "Hi?", chat_template=OVERRIDE) == "Q: <image>Hi? A:"


def test_template_that_rewrites_earlier_turns_is_refused(processor, tmp_path):
    png(tmp_path / "img" / "a.png")
    data = load_dataset(llava_file(tmp_path, [TWO_TURNS]))
    cue_only_when_asked = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: <image>{{ m['content'][-1]['text'] }}"
                           "{% else %} {{ m['content'][0]['text'] }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %} A:{% endif %}")
    with pytest.raises(DataError, match=r"id 'cat-7'.*renders earlier turns differently"):
        ChatCollator(processor, chat_template=cue_only_when_asked)([data[0]])


def test_caption_collator_uses_its_prompt(processor, tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    data = CaptionDataset(tmp_path / "d.jsonl")
    batch = CaptionCollator(processor, "Colour?")([data[0]])
    tok = processor.tokenizer
    ids = batch["input_ids"][0]
    assert tok.decode(ids[ids != tok.convert_tokens_to_ids("<image>")]) == "USER: \nColour? ASSISTANT: red</s>"


# ---------------------------------------------------------------- max_length

def _long_data(tmp_path):
    png(tmp_path / "img" / "a.png")
    records = [{"id": "short", "image": "img/a.png", "conversations": conv("<image>\nHi?", "A long answer " * 4)},
               {"id": "wordy", "image": "img/a.png", "conversations": conv("<image>\n" + "Tell me. " * 8, "Ok.")},
               TWO_TURNS]
    return llava_file(tmp_path, records)


def test_too_short_max_length_names_the_sample(processor, tmp_path):
    data = load_dataset(_long_data(tmp_path))
    full = ChatCollator(processor)([data[1]])
    need = spans(full["labels"][0])[0][0] + 1  # image + prompt + one answer token
    with pytest.raises(DataError, match=r"id 'wordy'.*need 1\d\d tokens > max_length"):
        ChatCollator(processor, max_length=need - 1)([data[1]])
    ChatCollator(processor, max_length=need)([data[1]])  # exactly enough
    with pytest.raises(DataError) as info:  # before training: all of them in one error
        ChatCollator(processor, max_length=need - 1).check_lengths(data)
    assert "1 sample(s) too long" in str(info.value) and "'wordy'" in str(info.value)


def test_skip_drops_and_counts_too_long_samples(processor, tmp_path, caplog):
    data, fresh = load_dataset(_long_data(tmp_path)), load_dataset(_long_data(tmp_path))
    need = spans(ChatCollator(processor)([data[1]])["labels"][0])[0][0] + 1
    collate = ChatCollator(processor, max_length=need - 1, on_bad_sample="skip")
    batch = collate([data[0], data[1]])  # at collate time: dropped from the batch, counted
    assert torch.equal(batch["input_ids"], ChatCollator(processor)([data[0]])["input_ids"])
    assert [p.id for p in collate.skipped] == ["wordy"]
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        problems = collate.check_lengths(data)
    assert [p.id for p in problems] == ["wordy"] and len(data) == 2
    assert [e.id for e in data.examples] == ["short", "cat-7"] and [p.id for p in data.skipped] == ["wordy"]
    assert "skipped 1 too long sample(s): item 2 (id 'wordy')" in caplog.text
    with pytest.raises(DataError, match="every sample of a batch was skipped"):
        collate([fresh[1]])


def test_long_answer_is_cut_at_max_length_with_image_intact(processor, tmp_path):
    data = load_dataset(_long_data(tmp_path))
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    full = ChatCollator(processor)([data[0]])
    start = spans(full["labels"][0])[0][0]
    collate = ChatCollator(processor, max_length=start + 5)
    batch = collate([data[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.shape == (start + 5,) and torch.equal(ids, full["input_ids"][0, :start + 5])
    assert int((ids == image_id).sum()) == N_IMAGE
    assert torch.equal(labels[start:], ids[start:]) and (labels[:start] == IGNORE_INDEX).all()
    assert tok.decode(labels[start:]) == tok.decode(full["labels"][0, start:start + 5])
    assert collate.truncated == ["short"]


def test_multi_turn_cut_keeps_whole_turns_before(processor, tmp_path):
    data = load_dataset(_long_data(tmp_path))
    tok = processor.tokenizer
    full = ChatCollator(processor)([data[2]])
    (s1, e1), (s2, _) = spans(full["labels"][0])
    batch = ChatCollator(processor, max_length=s2)([data[2]])  # the second answer cannot start: turn 2 dropped
    labels = batch["labels"][0]
    assert batch["input_ids"].shape == (1, e1) and tok.decode(labels[labels != IGNORE_INDEX]) == " It is red.</s>"
    batch = ChatCollator(processor, max_length=s2 + 2)([data[2]])  # two tokens of the second answer fit
    assert [e - s for s, e in spans(batch["labels"][0])] == [e1 - s1, 2]


# ---------------------------------------------------------------- BLIP-2: no chat template

def test_blip2_processor_labels_caption_and_eos(tmp_path):
    from transformers import AutoProcessor

    from vlm_lora.architectures.tiny_models import NUM_QUERY_TOKENS, save_tiny_blip2

    processor = AutoProcessor.from_pretrained(save_tiny_blip2(tmp_path / "blip2"))
    png(tmp_path / "a.png", size=(20, 30)), png(tmp_path / "b.png", "blue")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red square"}) + "\n"
                                      + json.dumps({"image": "b.png", "caption": "blue"}) + "\n")
    data = load_dataset(tmp_path / "d.jsonl", prompt="Describe the image.")
    batch = ChatCollator(processor)([data[0], data[1]])
    tok, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    for row, caption in enumerate(["a red square", "blue"]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == " " + caption + "</s>"
        assert (ids[:NUM_QUERY_TOKENS] == image_id).all() and (labels[ids == image_id] == IGNORE_INDEX).all()
    prompt = build_prompt(processor, "Describe the image.")
    assert prompt == "Describe the image."
    start = spans(batch["labels"][0])[0][0]
    expected = processor(images=[data[0][0]], text=[prompt], return_tensors="pt")["input_ids"][0]
    assert torch.equal(batch["input_ids"][0, :start], expected)


# ---------------------------------------------------------------- missing and corrupt images

def _bad_rows(tmp_path):
    png(tmp_path / "ok1.png"), png(tmp_path / "ok2.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"image": "ok1.png", "caption": "a"}, {"image": "gone.png", "caption": "b"},
            {"image": "corrupt.png", "caption": "c"}, {"image": "ok2.png", "caption": "d"},
            {"image": "also_gone.png", "caption": "e"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "d.jsonl"


def test_bad_images_all_listed_in_one_error(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_bad_rows(tmp_path))
    message = str(info.value)
    assert "3 bad row(s)" in message
    assert "line 2: image not found" in message and "gone.png" in message
    assert "line 3: cannot read image" in message and "corrupt.png" in message
    assert "line 5: image not found" in message and "also_gone.png" in message
    assert "line 1" not in message and "line 4" not in message


def test_bad_images_skipped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        data = load_dataset(_bad_rows(tmp_path), on_bad_sample="skip")
    assert [e.id for e in data.examples] == [1, 4]
    assert [p.id for p in data.skipped] == [2, 3, 5]
    assert "skipped 3 bad sample(s): line 2 (image not found), line 3 (cannot read image" in caplog.text
    llava = [{"id": "a", "image": "gone.png", "conversations": conv("Q", "A")}, {"id": "b", "conversations": conv("Q", "A")},
             {"id": "c", "image": "ok1.png", "conversations": conv("Q", "A")}]
    data = load_dataset(llava_file(tmp_path, llava), on_bad_sample="skip")
    assert [e.id for e in data.examples] == ["b", "c"] and [p.id for p in data.skipped] == ["a"]
    assert data.examples[0].text_only  # no image: a text-only sample


def test_image_broken_after_the_check_is_skipped_by_the_collator(processor, tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "b.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n"
                                      + json.dumps({"image": "b.png", "caption": "y"}) + "\n")
    data = load_dataset(tmp_path / "d.jsonl", on_bad_sample="skip")
    (tmp_path / "b.png").write_bytes(b"gone bad")
    collate = ChatCollator(processor, on_bad_sample="skip")
    batch = collate([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 1 and [p.id for p in collate.skipped] == [2]
    with pytest.raises(DataError, match="every sample of a batch was skipped"):
        collate([data[1]])


def test_processor_without_template_gets_the_llava_fallback(processor, tmp_path):
    import copy

    bare = copy.deepcopy(processor)
    bare.chat_template = None
    png(tmp_path / "img" / "a.png")
    data = load_dataset(llava_file(tmp_path, [TWO_TURNS]))
    collate = ChatCollator(bare)
    assert collate.render(data.examples[0]) == [
        "USER: <image>\nWhat colour is it? ASSISTANT:", "USER: <image>\nWhat colour is it? ASSISTANT: It is red.</s>",
        "USER: <image>\nWhat colour is it? ASSISTANT: It is red.</s>USER: Any shapes? ASSISTANT:",
        "USER: <image>\nWhat colour is it? ASSISTANT: It is red.</s>USER: Any shapes? ASSISTANT: One big square.</s>"]
    assert build_prompt(bare, "What colour is it?") == collate.render(data.examples[0])[0]
    labels = collate([data[0]])["labels"][0]
    assert [processor.tokenizer.decode(labels[s:e]) for s, e in spans(labels)] == [" It is red.</s>", " One big square.</s>"]
