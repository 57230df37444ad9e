"""Data that users bring with their own habits: one clear error naming the file, row or key (and with
``on_bad_sample: skip`` the row skipped and counted) where a raw traceback or a silent loss used to be."""

import base64
import gzip
import io
import json
import logging
import tarfile

import pytest
from PIL import Image

from vlm_lora.data import DataError, load_dataset
from vlm_lora.data.datasets import ShardStream


def png_bytes(color="red", size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, columns, image_feature=True):
    import datasets

    table = datasets.Dataset.from_dict(columns)
    if image_feature:
        table = table.cast_column("image", datasets.Image())
    table.to_parquet(str(path))
    return path


def write_shard(path, n, image=None):
    """A tar shard of ``n`` samples ``000.png`` + ``000.txt`` ...; returns its bytes."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:03d}.png", image or png_bytes()), (f"{i:03d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def user(*parts, **extra):
    return {"role": "user", "content": list(parts), **extra}


def answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def text(t):
    return {"type": "text", "text": t}


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("as_glob", [False, True])
def test_empty_parquet_file_is_named_or_skipped(tmp_path, caplog, as_glob):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "a.parquet", {"image": [{"bytes": png_bytes(), "path": None}] * 2, "caption": ["x", "y"]})
    (folder / "b.parquet").write_bytes(b"")
    path = str(folder / "*.parquet") if as_glob else str(folder)
    with pytest.raises(DataError, match=r"b\.parquet: empty file \(0 bytes\)"):
        load_dataset(path)
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        data = load_dataset(path, on_bad_sample="skip")
    assert len(data) == 2 and "skipped 1 empty parquet file(s)" in caplog.text and "b.parquet" in caplog.text
    (folder / "c.parquet").write_bytes(b"not parquet at all")  # rows lost: refused in skip mode too
    with pytest.raises(DataError, match=r"c\.parquet: not a parquet file"):
        load_dataset(path, on_bad_sample="skip")
    (folder / "c.parquet").unlink()
    write_parquet(folder / "d.parquet", {"image": [{"bytes": png_bytes(), "path": None}], "text": ["z"]})
    with pytest.raises(DataError, match=r"different columns: .*a\.parquet has image, caption; .*d\.parquet has"):
        load_dataset(path, on_bad_sample="skip")


def test_int_image_column_names_the_file_and_column(tmp_path):
    path = write_parquet(tmp_path / "ids.parquet", {"image": [1, 2], "caption": ["x", "y"]}, image_feature=False)
    with pytest.raises(DataError, match=r"ids\.parquet: column 'image' holds int64 values, not images"):
        load_dataset(path)
    with pytest.raises(DataError, match=r"line 1: 'image' must be a path \(or a list of paths\), not int"):
        load_dataset(write_jsonl(tmp_path / "ids.jsonl", [{"image": 7, "caption": "x"}]))


def test_compressed_or_binary_files_are_refused_by_name(tmp_path):
    write_shard(tmp_path / "s.tar", 2)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    for path in (tmp_path / "s.tar.gz", str(tmp_path / "s-{0..1}.tar.gz")):
        with pytest.raises(DataError, match=r"s(\.|-{0..1}\.)tar\.gz: compressed tar shards are not read"):
            load_dataset(path)
    folder = tmp_path / "gz"
    folder.mkdir()
    (folder / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.tar\.gz: compressed tar shards"):
        load_dataset(folder)
    (tmp_path / "rows.jsonl").write_bytes(gzip.compress(b'{"image": "a.png", "caption": "x"}\n'))
    with pytest.raises(DataError, match=r"rows\.jsonl: a gzip-compressed file"):
        load_dataset(tmp_path / "rows.jsonl")
    (tmp_path / "blob.bin").write_bytes(b"{\xff\xfe")
    with pytest.raises(DataError, match=r"blob\.bin: not UTF-8 text \(byte 1\)"):
        load_dataset(tmp_path / "blob.bin")


# ---------------------------------------------------------------- rows

def test_embedded_image_over_the_pixel_limit_is_named_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # > 2x the limit: PIL's DecompressionBombError
    big, small = png_bytes(size=(64, 64)), png_bytes()
    path = write_parquet(tmp_path / "d.parquet", {"image": [{"bytes": small, "path": None},
                                                            {"bytes": big, "path": None}], "caption": ["x", "y"]})
    with pytest.raises(DataError, match=r"d\.parquet row 1: cannot read image .*exceeds limit"):
        load_dataset(path)[1]
    data = load_dataset(path, on_bad_sample="skip")
    assert data[0][0].size == (16, 16) and data[1][0] is None  # the collators drop and count a None image
    write_shard(tmp_path / "s.tar", 1, image=big)  # a streamed shard's bytes: the same
    with pytest.raises(DataError, match=r"s\.tar sample '000': cannot read image .*exceeds limit"):
        load_dataset(tmp_path / "s.tar", streaming=False)[0]


@pytest.mark.parametrize("kind", ["chat", "llava"])
def test_image_in_an_assistant_turn_names_the_row(tmp_path, kind):
    (tmp_path / "a.png").write_bytes(png_bytes())
    if kind == "chat":
        bad = {"messages": [user(text("What?")), {"role": "assistant", "content": [{"type": "image"}, text("This.")]}],
               "images": ["a.png"]}
        good = {"messages": [user({"type": "image"}, text("What?")), answer("A square.")], "images": ["a.png"]}
    else:
        bad = {"image": "a.png", "conversations": [{"from": "human", "value": "What?"},
                                                   {"from": "gpt", "value": "<image>\nThis."}]}
        good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "A square."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"line 2: message 2 \((assistant|gpt)\) holds an image; images go in user"):
        load_dataset(path)
    data = load_dataset(path, on_bad_sample="skip")
    assert len(data) == 1 and [p.id for p in data.skipped] == [2]


def test_two_image_markers_with_one_image_name_the_row(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [{"id": "twice", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>\nWhat?"},
                                                                {"from": "gpt", "value": "A square."}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"item 1 \(id 'twice'\): 1 image\(s\) but 2 <image> markers"):
        load_dataset(path)
    rows.append({**rows[0], "id": "once", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "A square."}]})
    path.write_text(json.dumps(rows))
    data = load_dataset(path, on_bad_sample="skip")
    assert [e.id for e in data.examples] == ["once"] and [p.id for p in data.skipped] == ["twice"]


def test_images_inside_messages_are_read(tmp_path, monkeypatch):
    red, blue = png_bytes("red"), png_bytes("blue", (24, 16))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(red)
    (tmp_path / "img" / "blue.png").write_bytes(blue)
    uri = "data:image/png;base64," + base64.b64encode(blue).decode()
    rows = [
        {"messages": [user({"type": "image", "image": "img/red.png"}, text("What?")), answer("Red.")]},  # inline path
        {"messages": [user(text("What?")), answer("Red."),  # message-level images, string content
                      {"role": "user", "content": "<image>\nAnd this?", "images": ["img/blue.png"]}, answer("Blue.")]},
        {"messages": [user({"type": "image"}, text("What?"), images=["img/red.png"]), answer("Red.")]},
        {"messages": [user({"type": "image", "path": "img/red.png"}, {"type": "image"},  # inline + row-level
                           {"type": "image_url", "image_url": {"url": uri}}, text("Compare.")), answer("All squares.")],
         "images": ["img/blue.png"]},
    ]
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(data) == 4 and not data.skipped
    sizes = lambda item: [im.size for im in (item[0] if isinstance(item[0], list) else [item[0]])]
    assert sizes(data[0]) == [(16, 16)] and data.examples[0].turns == [("What?", "Red.")]
    assert data.examples[1].image_turns is None and data.examples[1].turns[1] == ("And this?", "Blue.")
    assert sizes(data[1]) == [(24, 16)]
    assert sizes(data[2]) == [(16, 16)]
    assert sizes(data[3]) == [(16, 16), (24, 16), (24, 16)] and data.examples[3].image_turns == [3]
    assert data[3][0][2].getpixel((0, 0)) == (0, 0, 255)  # the data: URI's blue image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8 * 8)  # inline bytes are checked like image files
    inline = [{"messages": [user({"type": "image", "image": uri}, text("What?")), answer("Blue.")]}]
    with pytest.raises(DataError, match=r"line 1: cannot read image \(inline\): Image size \(384 pixels\) exceeds"):
        load_dataset(write_jsonl(tmp_path / "inline.jsonl", inline))
    monkeypatch.undo()

    import datasets

    embedded = [{"messages": [user({"type": "image", "image": {"bytes": blue, "path": None}}, text("What?")),
                              answer("Blue.")], "images": []}]  # an empty row-level column beside inline images
    datasets.Dataset.from_list(embedded).to_parquet(str(tmp_path / "m.parquet"))
    parquet = load_dataset(tmp_path / "m.parquet")
    assert sizes(parquet[0]) == [(24, 16)] and parquet.examples[0].turns == [("What?", "Blue.")]

    wrong = [{"messages": [user({"type": "image", "image": "img/red.png"}, {"type": "image"}, {"type": "image"},
                                text("Three?")), answer("No.")], "images": ["img/blue.png"]},
             {"messages": [user({"type": "image", "image": "https://example.com/x.png"}, text("?")), answer("No.")]}]
    with pytest.raises(DataError, match=r"line 1: 1 row-level image\(s\) but 2 image part\(s\)(.|\n)*"
                                        r"line 2: image URLs are not downloaded"):
        load_dataset(write_jsonl(tmp_path / "w.jsonl", wrong + rows[:1]))


# ---------------------------------------------------------------- tar shards

def test_truncated_shard_names_the_sample_at_the_cut(tmp_path):
    full = write_shard(tmp_path / "full.tar", 6)
    boundary = full.index(b"003.png")  # the header of sample 3: a cut here lost its tail silently before
    for cut, lost in ((boundary, "002"), (boundary + 512 + 100, "003")):
        (tmp_path / "cut.tar").write_bytes(full[:cut])
        with pytest.raises(DataError, match=rf"cut\.tar sample '{lost}': the tar shard is cut short \(truncated\)"):
            load_dataset(tmp_path / "cut.tar", streaming=False)
        data = load_dataset(tmp_path / "cut.tar", streaming=False, on_bad_sample="skip")
        kept = int(lost)
        assert [e.id for e in data.examples] == [f"{i:03d}" for i in range(kept)]
        assert [p.id for p in data.skipped] == [lost]
        stream = load_dataset(tmp_path / "cut.tar", on_bad_sample="skip")
        items = list(stream.samples(stream.shards))
        assert [i.id for i in items] == [f"{i:03d}" for i in range(kept)] + [lost]


def test_streamed_shards_are_checked_at_start(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    full = write_shard(folder / "s-0.tar", 3)
    (folder / "s-1.tar").write_bytes(full[:2000])
    (folder / "s-2.tar").write_bytes(b"garbage " * 200)
    pattern = str(folder / "s-{0..2}.tar")
    with pytest.raises(DataError, match=r"2 bad tar shard\(s\):\n  - .*s-1\.tar: truncated \(2000 bytes"
                                        r"(.|\n)*s-2\.tar: not a readable tar file"):
        load_dataset(pattern)
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        stream = load_dataset(pattern, on_bad_sample="skip")
    assert isinstance(stream, ShardStream) and "s-1.tar" in caplog.text and "s-2.tar" in caplog.text
    with pytest.raises(DataError, match=r"1 of 2 tar shard\(s\) not found \(first: .*s-9\.tar\)"):
        load_dataset(str(folder / "s-{0,9}.tar"))


class Ids:
    """A collate that returns the sample ids (a batch dict) and drops nothing itself."""

    skipped: list = []

    def __call__(self, items):
        return {"ids": [example.id for _, example in items]}


def test_truncated_streamed_shard_counts_each_lost_sample_once(tmp_path):
    from vlm_lora.data.loader import TrainLoader

    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "s-0.tar", 3)
    full = write_shard(folder / "s-1.tar", 3)
    (folder / "s-1.tar").write_bytes(full[:full.index(b"001.png") + 512 + 100])  # cut inside sample 001's image
    loader = TrainLoader(load_dataset(str(folder / "s-{0..1}.tar"), on_bad_sample="skip"), Ids(), batch_size=2,
                         seed=0, num_workers=0)
    loader.start(0)
    batches, _ = loader.next(6, "cpu")  # 4 good samples an epoch: three epochs
    assert sorted(i for b in batches for i in b["ids"]) == ["000"] * 6 + ["001"] * 3 + ["002"] * 3
    assert [(p.id, p.where.split("/")[-1]) for p in loader.skipped] == [("001", "s-1.tar sample '001'")]
