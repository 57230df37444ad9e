"""Video rows (vlm_lora.data.video) on tiny Qwen2.5-VL: frames folders read and sampled, labels exactly the
answers, video_grid_thw as the processor's own resize predicts, images and videos mixed, other families
refused by name; 2 training steps and an eval on the embedded video set."""

import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import ASSET_MODEL, REPO
from vlm_lora.data import IGNORE_INDEX, ChatCollator, DataError, load_dataset
from vlm_lora.data.pixels import smart_resize
from vlm_lora.data.video import VideoRef, check_video, load_clip, sample_indices, set_video_options

VIDEO_DATA = REPO / "assets" / "data" / "video"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from vlm_lora.architectures.tiny_processors import save_tiny_family

    return save_tiny_family("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen2_5_vl"))


@pytest.fixture(scope="module")
def processor(qwen_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(qwen_dir)


def _frames(folder, n, size=(60, 44)):
    folder.mkdir()
    for k in range(n):
        Image.new("RGB", size, (20 * k, 0, 0)).save(folder / f"f{k:02d}.png")
    return folder


def test_frame_sampling():
    # 12 frames at 4 fps = 3 s; 2 fps -> 6 frames, first and last kept; capped and rounded to even counts
    assert sample_indices(12, 4, 2, 100) == [0, 2, 4, 7, 9, 11]
    assert sample_indices(12, 4, 2, 5) == [0, 4, 7, 11]
    assert sample_indices(12, 4, 1.5, 100) == [0, 4, 7, 11]  # 4.5 frames -> 4
    assert sample_indices(1, 2, 2, 100) == [0, 0]  # a single frame is repeated to the temporal patch
    assert sample_indices(3, 2, 2, 100, multiple=1) == [0, 1, 2]


def test_rows_read_and_bad_videos_named(tmp_path):
    _frames(tmp_path / "clip", 4)
    Image.new("RGB", (48, 48), "red").save(tmp_path / "red.png")
    (tmp_path / "movie.mp4").write_bytes(b"\x00" * 64)
    rows = [{"video": "clip", "caption": "a clip"},
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "video", "video": "clip"},
                                                       {"type": "text", "text": "Same colour?"}]},
                          {"role": "assistant", "content": "Yes."}], "images": ["red.png"]},
            {"video": "clip", "video_fps": 8, "question": "<video>\nWhat moves?", "answer": "nothing",
             "options": ["nothing", "all"]},
            {"video": "missing", "caption": "x"},
            {"video": "movie.mp4", "caption": "x"},
            {"video": "clip", "video_fps": -1, "caption": "x"},
            {"video": ["clip", "clip"], "conversations": [{"from": "human", "value": "<video>\nA?"},
                                                          {"from": "gpt", "value": "B."}]},
            {"image": "red.png", "question": "<video> What moves?", "answer": "x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path / "rows.jsonl")
    message = str(error.value)
    assert "line 4: video not found: " in message and "missing" in message
    assert f"line 5: cannot decode video file {tmp_path / 'movie.mp4'}: no video decoder" in message
    assert "pip install av" in message
    assert "line 6: 'video_fps' must be a positive number" in message
    assert "line 7: 2 video(s) but 1 <video> markers" in message
    assert "line 8: 0 video(s) but 1 <video> markers" in message
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    video_only, mixed, question = load_dataset(tmp_path / "good.jsonl").examples
    assert video_only.image_path is None and video_only.image_turns == [0] and video_only.video_turns == [1]
    assert mixed.image_path == tmp_path / "red.png" and mixed.video_turns == [1] and mixed.turns[0][0] == "Same colour?"
    assert question.question == "What moves?" and question.videos == [VideoRef(tmp_path / "clip", 8.0)]
    assert question.turns[0][0].startswith("What moves?\nA. nothing\nB. all\n")  # the choice prompt's lines kept
    (tmp_path / "empty").mkdir()
    assert check_video(VideoRef(tmp_path / "empty")) == f"video folder {tmp_path / 'empty'} holds no .png/.jpg/.jpeg frames"


def test_video_collates_with_labels_on_the_answer(processor, tmp_path):
    _frames(tmp_path / "clip", 8)  # 8 frames at the default 2 fps = 4 s
    Image.new("RGB", (48, 48), "red").save(tmp_path / "red.png")
    rows = [{"video": "clip", "caption": "a dark clip"},
            {"image": "red.png", "video": "clip", "video_fps": 4, "question": "What is shown?", "answer": "red"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(tmp_path / "rows.jsonl")
    set_video_options(processor, fps=1, max_frames=100, max_pixels=24 * 24)
    batch = ChatCollator(processor)([data[0], data[1]])
    video = processor.video_processor
    # every frame resized by the family's rule (factor patch x merge), frames in pairs (temporal patch 2)
    h, w = smart_resize(44, 60, video.patch_size * video.merge_size, video.size["shortest_edge"], 24 * 24)
    assert (h, w) == (16, 24)
    frames = [len(sample_indices(8, 2, 1, 100)), len(sample_indices(8, 4, 1, 100))]  # 4 and 2 frames
    assert batch["video_grid_thw"].tolist() == [[n // 2, h // 4, w // 4] for n in frames]
    video_id, image_id = processor.video_token_id, processor.image_token_id
    assert [int((row == video_id).sum()) for row in batch["input_ids"]] == [n // 2 * 6 * 4 // 4 for n in frames]
    assert int((batch["input_ids"][1] == image_id).sum()) == batch["image_grid_thw"][0].prod() // 4 > 0
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(-1).sum())
    tok, labels = processor.tokenizer, batch["labels"]
    assert tok.decode(labels[0][labels[0] != IGNORE_INDEX]) == "a dark clip<|im_end|>\n"
    assert tok.decode(labels[1][labels[1] != IGNORE_INDEX]) == "red<|im_end|>\n"
    text = tok.decode(batch["input_ids"][1])
    assert text.index("<|image_pad|>") < text.index("<|video_pad|>") < text.index("What is shown?")
    # generation (eval) asks each video sample with its video
    from vlm_lora.data.video import media_batch, video_prompts

    prompts = video_prompts(processor, data.examples, ["unused"] * 2, ["Describe the clip.", "What is shown?"])
    assert prompts[0].endswith("<|vision_start|><|video_pad|><|vision_end|>Describe the clip.<|im_end|>\n"
                               "<|im_start|>assistant\n")
    generation = media_batch(processor, [data[0][0], data[1][0]], prompts, "cpu", torch.float32)
    assert torch.equal(generation["video_grid_thw"], batch["video_grid_thw"])
    assert torch.equal(generation["pixel_values_videos"], batch["pixel_values_videos"])
    clip = load_clip(data.examples[0].videos[0], processor)
    assert clip.indices == [0, 2, 5, 7] and clip.metadata().sampled_fps == 1.0
    # check_lengths measures the video tokens the collator makes: the first answer token at `start`
    start = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(DataError, match=rf"line 1: image \+ prompt \+ first answer token need {start + 1} tokens"):
        ChatCollator(processor, max_length=start).check_lengths(data)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_other_video_families_collate_and_train(family):
    """Labels exactly the answers, the video tokens the processor's own resize predicts, a finite loss and gradient."""
    from vlm_lora.architectures.tiny_families import tiny_config, tiny_family_model, token_ids
    from vlm_lora.architectures.tiny_processors import STYLE, tiny_processor, tiny_tokenizer

    processor = tiny_processor(family)
    model = tiny_family_model(family, config=tiny_config(family, len(processor.tokenizer),
                                                         token_ids(len(tiny_tokenizer(STYLE[family])))))
    set_video_options(processor, fps=2, max_frames=4)
    data = load_dataset(VIDEO_DATA / "train.jsonl")
    examples = [min(data.examples, key=_source_frames), max(data.examples, key=_source_frames)]  # 4 and 8 at 4 fps
    batch = ChatCollator(processor)([data[data.examples.index(e)] for e in examples])
    labels, tok = batch["labels"], processor.tokenizer
    for row, example in zip(labels, examples):
        assert tok.decode(row[row != IGNORE_INDEX]) == example.captions[0] + "<|im_end|>\n"
    video_id = model.config.video_token_id if family != "llava_onevision" else model.config.video_token_index
    if family == "llava_onevision":  # 4 frames each (fixed count), 2 x 2 pooled tokens per frame + a newline
        assert batch["pixel_values_videos"].shape[:2] == (2, 4)
        assert [int((row == video_id).sum()) for row in batch["input_ids"]] == [4 * 4 + 1] * 2
    else:  # Qwen: 2 and 4 frames (2 fps of 1 s and 2 s) of 56 x 56, frame pairs of 4 x 4 patches merged 2 x 2
        assert [_source_frames(e) for e in examples] == [4, 8]
        size = processor.video_processor.size
        low, high = size["shortest_edge"], size["longest_edge"]
        if family == "qwen3_vl":  # Qwen3-VL's resize caps the whole clip (frames x area), 2-VL's each frame
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_resize

            sides = [clip_resize(n, 56, 56, 2, 8, low, high) for n in (2, 4)]
        else:
            sides = [smart_resize(56, 56, 8, low, high)] * 2
        grids = [[n // 2, h // 4, w // 4] for n, (h, w) in zip((2, 4), sides)]
        assert batch["video_grid_thw"].tolist() == grids
        assert [int((row == video_id).sum()) for row in batch["input_ids"]] == [t * h * w // 4 for t, h, w in grids]
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0
    # generation as eval runs it: left-padded prompts with the videos, same video tensors as training
    from vlm_lora.data.video import media_batch, video_prompts

    tok.padding_side = "left"
    prompts = video_prompts(processor, examples, [""] * 2, [e.turns[0][0] for e in examples])
    inputs = media_batch(processor, [data[data.examples.index(e)][0] for e in examples], prompts, "cpu", torch.float32)
    assert torch.equal(inputs["pixel_values_videos"], batch["pixel_values_videos"])
    out = model.eval().generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def _source_frames(example) -> int:
    return len(list(example.videos[0].path.glob("*.png")))


class _FakeAV:
    """A stand-in for PyAV (not installed here): a 10-frame, 5 fps file whose frame k is grey level 20 k."""

    __spec__ = __import__("importlib").machinery.ModuleSpec("av", None)

    def __init__(self, frames_in_header):
        self.header, self.decoded = frames_in_header, []

    def open(self, path):
        fake = self
        stream = type("Stream", (), {"frames": self.header, "average_rate": 5})()

        class Frame:
            def __init__(self, k):
                self.k = k

            def to_image(self):
                fake.decoded.append(self.k)
                return Image.new("L", (40, 30), 20 * self.k)

        class Container:
            streams = type("Streams", (), {"video": [stream]})()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def decode(self, _):
                return (Frame(k) for k in range(10))

        return Container()


@pytest.mark.parametrize("frames_in_header", [10, 0])
def test_video_file_through_pyav(processor, tmp_path, monkeypatch, frames_in_header):
    import sys

    fake = _FakeAV(frames_in_header)
    monkeypatch.setitem(sys.modules, "av", fake)
    (tmp_path / "clip.mp4").write_bytes(b"not read by the fake")
    set_video_options(processor, fps=1, max_frames=100)
    clip = load_clip(VideoRef(tmp_path / "clip.mp4"), processor)
    assert clip.indices == sample_indices(10, 5, 1, 100) == [0, 9] and clip.total == 10 and clip.source_fps == 5
    assert [frame.getpixel((0, 0)) for frame in clip.frames] == [(0, 0, 0), (180, 180, 180)]
    assert fake.decoded == ([0, 9] if frames_in_header else list(range(10)))  # known count: only those converted


def test_unreadable_video_is_named_or_skipped(processor, tmp_path):
    _frames(tmp_path / "clip", 4)
    (tmp_path / "clip" / "f01.png").write_bytes(b"not a png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"video": "clip", "caption": "x"}) + "\n")
    data = load_dataset(tmp_path / "rows.jsonl")  # the folder has frames: checked when read
    set_video_options(processor, fps=100, max_frames=4)
    with pytest.raises(DataError, match=r"line 1: cannot read video .*clip: cannot identify image file"):
        ChatCollator(processor)([data[0]])
    skipping = ChatCollator(processor, on_bad_sample="skip")
    with pytest.raises(DataError, match="every sample of a batch was skipped"):
        skipping([data[0]])
    assert skipping.skipped[0].where == "line 1" and skipping.skipped[0].reason.startswith("cannot read video")


def test_family_without_video_is_refused(tmp_path):
    from transformers import AutoProcessor

    _frames(tmp_path / "clip", 2)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"video": "clip", "caption": "x"}) + "\n")
    data = load_dataset(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=r"line 1: a video sample, but LlavaProcessor takes no videos here"):
        ChatCollator(AutoProcessor.from_pretrained(ASSET_MODEL))([data[0]])


def test_qwen2_5_vl_trains_and_evaluates_on_the_video_set(qwen_dir, tmp_path):
    from vlm_lora.recipe import apply_overrides, validate_recipe
    from vlm_lora.train import finetune

    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data = apply_overrides(data, [f"model.path={qwen_dir}", "data.video.fps=1", "data.video.max_frames=4",
                                  "data.prompt=Describe the video."])
    data["data"].update(train=str(VIDEO_DATA / "train.jsonl"), eval=str(VIDEO_DATA / "eval.jsonl"), num_workers=0)
    data["train"].update(batch_size=4, max_steps=2, save_steps=100, eval_steps=None, log_steps=1, warmup_steps=0,
                         eval_base=False, eval_samples=None, eval_batch_size=5, max_new_tokens=4)
    data["output_dir"] = str(tmp_path / "run")
    finetune(validate_recipe(data))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    predictions = [json.loads(line) for line in next((tmp_path / "run").rglob("*predictions*.jsonl")).read_text().splitlines()]
    references = [json.loads(line)["caption"] for line in (VIDEO_DATA / "eval.jsonl").read_text().splitlines()]
    assert [row["references"] for row in predictions] == [[caption] for caption in references]
    assert all(isinstance(row["prediction"], str) for row in predictions)
    assert predictions[0]["image"] == str(VIDEO_DATA / "clips" / "eval_000" / "frame_0.png")  # the first frame
    # the settings travel in the adapter folder: eval with the adapter samples frames as training did
    from transformers import AutoProcessor

    from vlm_lora.adapters.peft_format import read_meta
    from vlm_lora.cli import main
    from vlm_lora.data.video import video_options
    from vlm_lora.eval.pixels import use_adapter_pixels

    assert read_meta(tmp_path / "run" / "adapter")["processor"] == {"video": {"fps": 1.0, "max_frames": 4}}
    fresh = AutoProcessor.from_pretrained(qwen_dir)
    assert video_options(fresh) == (2.0, 768)
    use_adapter_pixels(fresh, [tmp_path / "run" / "adapter"])
    assert video_options(fresh) == (1.0, 4)
    from vlm_lora.adapters.merge import merge_adapter

    merge_adapter(str(qwen_dir), tmp_path / "run" / "adapter", tmp_path / "merged")
    assert video_options(AutoProcessor.from_pretrained(tmp_path / "merged")) == (1.0, 4)

    main(["eval", "--model", str(qwen_dir), "--adapter", str(tmp_path / "run" / "adapter"), "--task", "vqa",
          "--data", str(VIDEO_DATA / "qa_eval.jsonl"), "--limit", "4", "--max-new-tokens", "3",
          "--out", str(tmp_path / "qa"), "--contact-sheet", "2"])  # base and adapter, with the HTML report
    rows = [json.loads(line) for line in (tmp_path / "qa" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["question"].startswith("Which way does the") and len(rows[0]["predictions"]) == 2
    assert (tmp_path / "qa" / "report.html").is_file() and (tmp_path / "qa" / "contact_sheet.png").is_file()
    main(["eval", "--model", str(qwen_dir), "--adapter", str(tmp_path / "run" / "adapter"), "--mixed-batch",
          "--data", str(VIDEO_DATA / "eval.jsonl"), "--limit", "3", "--max-new-tokens", "3", "--out", str(tmp_path / "mixed")])
    rows = [json.loads(line) for line in (tmp_path / "mixed" / "predictions.jsonl").read_text().splitlines()]
    assert [row["references"] for row in rows] == [[caption] for caption in references[:3]]


def test_recipe_video_errors_are_collected():
    from vlm_lora.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError) as error:
        validate_recipe({"model": {"path": "m"}, "data": {"train": "t", "video": {"fps": 0, "max_frame": 3}}})
    message = str(error.value)
    assert "2 error(s)" in message and "data.video.fps: Input should be greater than 0" in message
    assert "data.video.max_frame: unknown key; did you mean 'max_frames'?" in message
