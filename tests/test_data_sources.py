"""Parquet, HF datasets, WebDataset shards and chat-messages rows give the samples (and batches) of their
JSONL copy; bad samples in them are named or skipped and counted; streamed shards split without repeats."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ASSET_DATA, ASSET_MODEL
from vlm_lora.data import ChatCollator, DataError, load_dataset
from vlm_lora.data.datasets import ShardStream
from vlm_lora.data.loader import StreamBatches, TrainLoader
from vlm_lora.data.sources import expand_braces, source_format

N_ROWS = 12
PROMPT = "Describe the image."


def microscopy_rows(n: int = N_ROWS) -> list[dict]:
    """The first ``n`` quickstart rows with absolute image paths."""
    rows = [json.loads(r) for r in (ASSET_DATA / "microscopy" / "train.jsonl").read_text().splitlines()[:n]]
    return [{"image": str(ASSET_DATA / "microscopy" / r["image"]), "caption": r["caption"]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bytes(path) -> bytes:
    return Path(path).read_bytes()


def chat_record(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
                         {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]}]}


def llava_record(row: dict) -> dict:
    return {"conversations": [{"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": row["caption"]}]}


def write_parquet(path: Path, rows: list[dict], kind: str = "struct", records=None, parts: int = 1) -> Path:
    """``kind``: struct (the Hub's Image feature), bytes, path, chat (messages + images), llava."""
    import datasets

    if kind == "chat":
        columns = {"messages": [chat_record(r)["messages"] for r in rows],
                   "images": [[{"bytes": _bytes(r["image"]), "path": None}] for r in rows]}
        features = None
    elif kind == "llava":
        columns = {"conversations": [llava_record(r)["conversations"] for r in rows],
                   "image": [{"bytes": _bytes(r["image"]), "path": None} for r in rows]}
        features = None
    else:
        image = {"struct": lambda r: {"bytes": _bytes(r["image"]), "path": "x.png"}, "bytes": lambda r: _bytes(r["image"]),
                 "path": lambda r: r["image"]}[kind]
        columns = {"image": [image(r) for r in rows], "caption": [r["caption"] for r in rows]}
        features = None
    table = datasets.Dataset.from_dict(columns)
    if kind in ("struct", "llava"):
        table = table.cast_column("image", datasets.Image())
    if kind == "chat":
        table = table.cast_column("images", datasets.List(datasets.Image()))
    if parts == 1:
        table.to_parquet(str(path))
        return path
    path.mkdir()
    for i in range(parts):
        table.shard(parts, i, contiguous=True).to_parquet(str(path / f"part-{i}.parquet"))
    return path


def write_shards(folder: Path, rows: list[dict], per_shard: int, as_json: bool = False, broken: dict | None = None) -> str:
    """Tar shards ``train-000000.tar`` ...; returns the brace pattern. ``broken``: {row: 'image' | 'caption'}."""
    folder.mkdir(exist_ok=True)
    n = (len(rows) + per_shard - 1) // per_shard
    for s in range(n):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(rows), (s + 1) * per_shard)):
                key = f"sample{i:04d}"
                image = b"not a png" if (broken or {}).get(i) == "image" else _bytes(rows[i]["image"])
                text = json.dumps({"caption": rows[i]["caption"]}).encode() if as_json else rows[i]["caption"].encode()
                members = [(f"{key}.png", image)]
                if (broken or {}).get(i) != "caption":
                    members.append((f"{key}.json" if as_json else f"{key}.txt", text))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{000000..{n - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def collator():
    from transformers import AutoProcessor

    return ChatCollator(AutoProcessor.from_pretrained(ASSET_MODEL), prompt=PROMPT)


@pytest.fixture(scope="module")
def jsonl_batches(tmp_path_factory, collator):
    data = load_dataset(write_jsonl(tmp_path_factory.mktemp("jsonl") / "d.jsonl", microscopy_rows()), prompt=PROMPT)
    return _batches(data, collator)


def _batches(data, collator, size: int = 4) -> list[dict]:
    return [collator([data[i] for i in range(s, min(s + size, len(data)))]) for s in range(0, len(data), size)]


def _assert_same(batches, expected):
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def _hf_saved(tmp_path, rows, dict_split=None):
    import datasets

    table = datasets.Dataset.from_dict({"image": [r["image"] for r in rows], "text": [r["caption"] for r in rows]})
    table = table.cast_column("image", datasets.Image())
    if dict_split:
        table = datasets.DatasetDict({dict_split: table})
    table.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


SOURCES = {
    "parquet_struct": lambda t, r: str(write_parquet(t / "d.parquet", r, "struct")),
    "parquet_bytes": lambda t, r: str(write_parquet(t / "d.parquet", r, "bytes")),
    "parquet_paths": lambda t, r: str(write_parquet(t / "d.parquet", r, "path")),
    "parquet_folder": lambda t, r: str(write_parquet(t / "folder", r, "struct", parts=3)),
    "parquet_glob": lambda t, r: str(write_parquet(t / "folder", r, "bytes", parts=2)) + "/part-*.parquet",
    "chat_messages": lambda t, r: str(write_parquet(t / "d.parquet", r, "chat")),
    "llava_parquet": lambda t, r: str(write_parquet(t / "d.parquet", r, "llava")),
    "hf_saved": lambda t, r: _hf_saved(t, r),
    "hf_saved_dict": lambda t, r: _hf_saved(t, r, dict_split="validation"),
    "tar_txt": lambda t, r: write_shards(t / "shards", r, per_shard=5),
    "tar_json": lambda t, r: write_shards(t / "shards", r, per_shard=4, as_json=True),
}


@pytest.mark.parametrize("kind", SOURCES)
def test_source_gives_the_batches_of_its_jsonl_copy(kind, tmp_path, collator, jsonl_batches):
    path = SOURCES[kind](tmp_path, microscopy_rows())
    data = load_dataset(path, prompt=PROMPT, split="validation" if kind == "hf_saved_dict" else "train",
                        streaming=False)
    assert len(data) == N_ROWS and not data.skipped
    assert [e.references for e in data.examples] == [[r["caption"]] for r in microscopy_rows()]
    _assert_same(_batches(data, collator), jsonl_batches)


def test_formats_are_inferred(tmp_path):
    assert source_format("a/train-{000..009}.tar") == source_format("x.tar") == "webdataset"
    assert source_format("x.parquet") == "parquet" and source_format("hf:org/name") == "hf_dataset"
    assert source_format(_hf_saved(tmp_path, microscopy_rows(2))) == "hf_dataset"
    assert source_format("d.jsonl") is None
    assert expand_braces("s-{00..02}-{a,b}.tar") == ["s-00-a.tar", "s-00-b.tar", "s-01-a.tar", "s-01-b.tar",
                                                     "s-02-a.tar", "s-02-b.tar"]


def test_multi_turn_chat_and_multi_image_rows(tmp_path):
    import datasets

    png = _bytes(microscopy_rows(1)[0]["image"])
    turn = lambda role, *parts: {"role": role, "content": list(parts)}
    text = lambda t: {"type": "text", "text": t}
    rows = [[turn("system", text("Be terse.")), turn("user", {"type": "image"}, text("What?")), turn("assistant", text("A cell.")),
             turn("user", text("Colour?")), turn("assistant", text("Blue."))],
            [turn("user", {"type": "image"}, {"type": "image"}, text("Compare.")), turn("assistant", text("Same."))]]
    table = datasets.Dataset.from_dict({"messages": rows, "images": [[{"bytes": png, "path": None}],
                                                                     [{"bytes": png, "path": None}] * 2]})
    table.cast_column("images", datasets.List(datasets.Image())).to_parquet(str(tmp_path / "chat.parquet"))
    data = load_dataset(tmp_path / "chat.parquet")
    sample, pair = data.examples
    assert sample.system == "Be terse." and sample.turns == [("What?", "A cell."), ("Colour?", "Blue.")]
    assert sample.n_images == 1 and sample.image_turns is None and not data.skipped
    assert data[0][0].size == Image.open(microscopy_rows(1)[0]["image"]).size
    assert pair.turns == [("Compare.", "Same.")] and pair.n_images == 2 and pair.image_turns == [2]
    assert [image.size for image in data[1][0]] == [data[0][0].size] * 2


# ---------------------------------------------------------------- bad samples

def _bad_parquet(tmp_path) -> str:
    import datasets

    rows = microscopy_rows(6)
    images = [{"bytes": _bytes(r["image"]), "path": None} for r in rows]
    images[1] = {"bytes": b"not an image", "path": None}
    images[4] = None  # a text-only row
    table = datasets.Dataset.from_dict({"image": images, "caption": [r["caption"] for r in rows]})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "bad.parquet"))
    return str(tmp_path / "bad.parquet")


def test_bad_parquet_rows_are_named(tmp_path, collator):
    path = _bad_parquet(tmp_path)
    data = load_dataset(path, on_bad_sample="skip")
    assert not data.skipped and len(data) == 6 and data.examples[4].text_only
    loader = TrainLoader(data, collator, batch_size=5, seed=0, num_workers=0)
    loader.start(0)
    data.on_bad_sample = "error"
    with pytest.raises(DataError, match=r"bad.parquet row 1: cannot read image"):
        loader.next(1, "cpu")


def test_bad_parquet_rows_skipped_and_counted_through_workers(tmp_path, collator):
    data = load_dataset(_bad_parquet(tmp_path), on_bad_sample="skip")
    loader = TrainLoader(data, collator, batch_size=5, seed=0, num_workers=2)
    loader.start(0)
    (batch,), samples = loader.next(1, "cpu")
    assert samples == 5 and batch["input_ids"].shape[0] == 4  # the corrupt image dropped in a worker
    assert [p.id for p in loader.skipped] == [1] and loader.skipped[0].where.endswith("bad.parquet row 1")


def test_over_long_embedded_samples_are_named_or_counted(tmp_path):
    import datasets
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ASSET_MODEL)
    rows = microscopy_rows(2)
    prompts = [PROMPT + " In detail:" + " and" * 60, PROMPT]  # the first cannot fit 80 tokens with its image
    table = datasets.Dataset.from_dict({
        "image": [{"bytes": _bytes(r["image"]), "path": None} for r in rows],
        "conversations": [[{"from": "human", "value": p}, {"from": "gpt", "value": r["caption"]}]
                          for p, r in zip(prompts, rows)]})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "d.parquet"))
    data = load_dataset(tmp_path / "d.parquet")
    strict = ChatCollator(processor, max_length=80, prompt=PROMPT)
    assert strict([data[1]])["input_ids"].shape[1] <= 80
    with pytest.raises(DataError, match=r"d.parquet row 0: image \+ prompt \+ first answer token need \d+ tokens"):
        strict([data[0], data[1]])
    loader = TrainLoader(data, ChatCollator(processor, max_length=80, prompt=PROMPT, on_bad_sample="skip"),
                         batch_size=2, seed=0, num_workers=2)
    loader.start(0)
    (batch,), samples = loader.next(1, "cpu")
    assert samples == 2 and batch["input_ids"].shape[0] == 1
    assert [p.id for p in loader.skipped] == [0] and "max_length 80" in loader.skipped[0].reason


def test_bad_tar_samples_are_named_or_skipped_and_counted(tmp_path, collator):
    pattern = write_shards(tmp_path / "shards", microscopy_rows(8), per_shard=4, broken={1: "image", 6: "caption"})
    strict = load_dataset(pattern)
    loader = TrainLoader(strict, collator, batch_size=2, seed=0, num_workers=0)
    loader.start(0)
    with pytest.raises(DataError, match=r"sample '(sample0001': cannot read image|sample0006': no caption)"):
        loader.next(4, "cpu")
    with pytest.raises(DataError, match=r"sample0006'.*no caption"):
        load_dataset(pattern, streaming=False)

    lenient = load_dataset(pattern, on_bad_sample="skip")
    loader = TrainLoader(lenient, collator, batch_size=2, seed=0, num_workers=2)
    loader.start(0)
    batches, samples = loader.next(4, "cpu")  # each worker's shard (4 samples; 3 with a caption) and one more
    assert samples == 8 and sum(b["input_ids"].shape[0] for b in batches) == 7  # the corrupt image dropped
    assert sorted(str(p.id) for p in loader.skipped) == ["sample0001", "sample0006"]


# ---------------------------------------------------------------- streaming

class SampleIds:
    """A collate that returns the sample ids (runs in the workers)."""

    skipped: list = []

    def __call__(self, items):
        return [example.id for _, example in items]


def _stream(pattern, **kwargs):
    source = load_dataset(pattern)
    assert isinstance(source, ShardStream)
    return StreamBatches(source, SampleIds(), batch_size=2, seed=3, **kwargs)


def _read(stream, workers):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)
    return [b.batch for b in loader]


def test_stream_splits_shards_across_ranks_and_workers_without_repeats(tmp_path):
    rows = microscopy_rows(16)
    pattern = write_shards(tmp_path / "shards", rows, per_shard=2)  # 8 shards for 2 ranks x 2 workers
    for epoch in range(2):
        seen = []
        for rank in range(2):
            stream = _stream(pattern, rank=rank, world=2, workers=2, epochs=epoch + 1)
            ids = [i for batch in _read(stream, 2) for i in batch]
            seen += ids[len(ids) // (epoch + 1) * epoch:] if epoch else ids
        assert sorted(seen) == [f"sample{i:04d}" for i in range(16)]  # each sample once per epoch
    first = [b for b in _read(_stream(pattern, rank=0, world=2, workers=2, epochs=2), 2)]
    other_seed = StreamBatches(load_dataset(pattern), SampleIds(), batch_size=2, seed=4, rank=0, world=2, workers=2, epochs=2)
    assert first == _read(_stream(pattern, rank=0, world=2, workers=2, epochs=2), 2)  # a pure function of the seed
    assert first != _read(other_seed, 2)


def test_stream_resumes_at_the_next_batch(tmp_path):
    pattern = write_shards(tmp_path / "shards", microscopy_rows(16), per_shard=2)
    full = _read(_stream(pattern, workers=2, epochs=3), 2)
    for skip in (1, 3, 4):
        assert _read(_stream(pattern, workers=2, epochs=3, skip=skip), 2)[:6] == full[skip:skip + 6]


def test_stream_needs_max_steps_and_enough_shards(tmp_path, collator):
    pattern = write_shards(tmp_path / "shards", microscopy_rows(4), per_shard=2)
    loader = TrainLoader(load_dataset(pattern), collator, batch_size=2, seed=0, num_workers=0)
    with pytest.raises(DataError, match="set train.max_steps"):
        loader.total_steps(epochs=1, per_step=1, max_steps=None)
    assert loader.total_steps(epochs=1, per_step=1, max_steps=5) == 5
    with pytest.raises(DataError, match=r"2 tar shard\(s\) cannot feed 1 process\(es\) x 4 loader worker"):
        StreamBatches(load_dataset(pattern), collator, 2, 0, workers=4)


def test_length_grouped_loader_follows_the_grouped_order(tmp_path):
    from vlm_lora.data.loader import micro_batches, text_lengths

    rows = microscopy_rows()
    data = load_dataset(write_parquet(tmp_path / "d.parquet", rows))
    loader = TrainLoader(data, SampleIds(), batch_size=3, seed=5, num_workers=2, group_by_length=True, group=2)
    loader.start(0)
    got = [next(loader._batches).batch for _ in range(4)]
    order = micro_batches(len(data), 3, 5, 0, text_lengths(data), group=2)
    assert got == [[data.examples[i].id for i in b] for b in order]
    words = text_lengths(data)
    assert words == [len(PROMPT.split()) + len(r["caption"].split()) for r in rows]


def test_data_keys_are_validated():
    from vlm_lora.recipe import RecipeError, validate_recipe

    base = {"model": {"path": "m"}, "data": {"train": "x.parquet"}}
    recipe = validate_recipe({**base, "data": {"train": "x.parquet", "num_workers": 2, "group_by_length": True,
                                               "streaming": False, "split": "validation", "format": "parquet"}})
    assert recipe.data.num_workers == 2 and recipe.data.streaming is False
    with pytest.raises(RecipeError, match=r"data.num_workers: .*greater than or equal to 0"):
        validate_recipe({**base, "data": {"train": "x", "num_workers": -1}})
    with pytest.raises(RecipeError, match=r"data.format: .*'webdataset'"):
        validate_recipe({**base, "data": {"train": "x", "format": "tar"}})


def test_stream_loader_resumes_or_says_it_restarts(tmp_path, caplog):
    pattern = write_shards(tmp_path / "shards", microscopy_rows(16), per_shard=2)

    def batches(position, saved=None, workers=2, n=3):
        loader = TrainLoader(load_dataset(pattern), SampleIds(), batch_size=2, seed=1, num_workers=workers)
        loader.start(position, saved)
        return [next(loader._batches).batch for _ in range(n)], loader.state()

    fresh, state = batches(0, n=8)
    assert state == {"workers": 2, "world": 1}
    assert batches(5, state)[0] == fresh[5:8]
    assert batches(5, {"workers": 1, "world": 1})[0] == fresh[:3]
    assert "restarting the stream at epoch 0" in caplog.text
